//! sha256 digests in the `sha256:<hex>` form registries use.

use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The format of [`StreamingDigest::state`]: sha2 0.11's serialised SHA-256 state.
const STATE_FORMAT: u8 = 1;

/// Hashes a stream incrementally.
#[derive(Default, Clone)]
pub struct StreamingDigest(Sha256);

impl StreamingDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }

    /// The hash of what was fed so far, as bytes to keep (a resumable upload's checkpoint):
    /// [`Self::restore`] continues from exactly here. The first byte names the format, so a
    /// state another version of the hashing crate cannot read is refused, not misread.
    pub fn state(&self) -> Vec<u8> {
        let mut state = vec![STATE_FORMAT];
        state.extend_from_slice(&self.0.serialize());
        state
    }

    /// The hash a [`Self::state`] was taken of; `None` if `state` is not one.
    pub fn restore(state: &[u8]) -> Option<Self> {
        let (&STATE_FORMAT, serialized) = state.split_first()? else {
            return None;
        };
        Sha256::deserialize(serialized.try_into().ok()?)
            .ok()
            .map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_state_finishes_as_the_uninterrupted_hash() {
        let mut first = StreamingDigest::default();
        first.update(b"hello ");
        let mut resumed = StreamingDigest::restore(&first.state()).expect("a state");
        resumed.update(b"world");
        assert_eq!(resumed.finish(), sha256(b"hello world"));
        assert!(StreamingDigest::restore(b"not a state").is_none());
        let mut other_format = first.state();
        other_format[0] = 2;
        assert!(StreamingDigest::restore(&other_format).is_none());
        assert!(StreamingDigest::restore(&[]).is_none());
    }
}
