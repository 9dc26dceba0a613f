//! Text columns read back as the domain types they were parsed into before they were stored:
//! a staging's `source_image` and `pinned_image` as [`ImageReference`]s, its `platform` as a
//! [`Platform`]. The worker and the pruner get typed values from the store instead of parsing
//! strings again.
//!
//! Every stored value was written from a parsed value (`NewStaging::parse`, the copy's
//! report), so it parses again. A release whose parser refuses something an earlier one
//! accepted must ship a migration that deals with the rows concerned: otherwise reading them
//! fails with a decode error naming the text.

use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueRef};
use sqlx::{Decode, Postgres, Type};

use crate::platform::Platform;
use crate::reference::ImageReference;

macro_rules! text_column {
    ($type:ty, $parse:path, $what:literal) => {
        impl Type<Postgres> for $type {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> Decode<'r, Postgres> for $type {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Postgres>>::decode(value)?;
                $parse(text)
                    .map_err(|e| format!(concat!("stored ", $what, " {:?}: {}"), text, e).into())
            }
        }
    };
}

text_column!(ImageReference, ImageReference::parse, "image reference");
text_column!(Platform, Platform::parse, "platform");
text_column!(
    super::location::StagingSource,
    super::location::StagingSource::parse_stored,
    "staging source"
);
