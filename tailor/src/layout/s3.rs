//! An OCI image layout under a prefix of an S3 bucket, through `object_store` (Apache Arrow's
//! maintained S3 client), with the directory layout's guarantees:
//!
//! - A blob is hashed as it is uploaded and gets its key only after it checks out: a small one
//!   by one `PUT` of the verified bytes, a large one by a multipart upload to its final key
//!   that is completed only after the digest matched, and aborted otherwise (S3 shows nothing
//!   of an uncompleted upload; a bucket lifecycle rule reaps the parts of a writer that died).
//! - A tag is `refs/<tag>` first (one atomic `PUT`), then `index.json`, updated by
//!   compare-and-swap on its ETag (`If-Match`, or `If-None-Match: *` when it is new), so two
//!   writers racing into one prefix lose no tag. The server must honour conditional writes
//!   (AWS S3 does; SeaweedFS from 4.18).
//!
//! Where: `s3://BUCKET/PREFIX[:TAG][?endpoint=URL&region=R&path_style=BOOL]`; the endpoint,
//! region and style may also come from the usual `AWS_*` variables. Credentials come from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else from a profile
//! of the shared credentials file (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`), else the
//! instance's role; never from the URL.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};

use super::{
    BlobStream, Descriptor, Index, LAYOUT_VERSION, LayoutError, MAX_INDEX_BYTES, check_tag,
    checked_hex, tag_entry,
};
use crate::digest::StreamingDigest;
use secrecy::{ExposeSecret, SecretString};

/// Blobs up to this size go up in one `PUT` of verified bytes; larger ones as a multipart
/// upload in parts of this size (S3's smallest part is 5 MiB).
const PART: usize = 8 * 1024 * 1024;
/// Tries of the `index.json` compare-and-swap before giving up on a very busy prefix.
const INDEX_TRIES: u32 = 32;
/// Longest one request to the store may take, body included (a part of [`PART`] bytes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an S3 layout is, parsed from `s3://BUCKET/PREFIX[:TAG][?QUERY]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    prefix: String,
    tag: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    /// Set by a program ([`S3Location::with_credentials`]), never parsed from the location.
    credentials: Option<(String, Redacted)>,
}

impl S3Location {
    /// Parses `s3://BUCKET/PREFIX[:TAG][?endpoint=URL&region=R&path_style=true|false]`.
    pub fn parse(text: &str) -> Result<Self, LayoutError> {
        let invalid = |problem: &str| {
            LayoutError::InvalidName(format!(
                "{}: {problem} (write s3://BUCKET/PREFIX[:TAG][?endpoint=URL&region=R&path_style=BOOL])",
                crate::text::clean(text, 200)
            ))
        };
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("not an s3:// location"))?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        // Not echoed: the text holds a secret.
        let credentials_refused = || {
            LayoutError::InvalidName(
                "an s3:// location: credentials never go in the location; set \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                    .into(),
            )
        };
        if rest.contains('@') {
            return Err(credentials_refused());
        }
        let (path, tag) = match path.rsplit_once(':') {
            Some((path, tag)) => {
                check_tag(tag)?;
                (path, Some(tag.to_owned()))
            }
            None => (path, None),
        };
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(invalid(
                "the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        let segments_ok = prefix.is_empty()
            || prefix.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'=')
                    })
            });
        if !segments_ok {
            return Err(invalid(
                "the prefix is '/'-separated names of letters, digits and '-', '_', '.', '+', '='",
            ));
        }
        let mut location = Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            tag,
            endpoint: None,
            region: None,
            path_style: None,
            credentials: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "endpoint" if value.starts_with("http://") || value.starts_with("https://") => {
                    location.endpoint = Some(value.trim_end_matches('/').to_owned());
                }
                "endpoint" => return Err(invalid("endpoint must be an http:// or https:// URL")),
                "region" if !value.is_empty() => location.region = Some(value.to_owned()),
                "path_style" => {
                    location.path_style = Some(
                        value
                            .parse()
                            .map_err(|_| invalid("path_style is true or false"))?,
                    );
                }
                key if key.contains("key") || key.contains("secret") || key.contains("token") => {
                    return Err(credentials_refused());
                }
                _ => return Err(invalid("the query takes endpoint, region and path_style")),
            }
        }
        Ok(location)
    }

    /// Uses these credentials rather than the environment's or a profile's.
    pub fn with_credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.credentials = Some((
            access_key_id.to_owned(),
            Redacted(SecretString::from(secret_access_key)),
        ));
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The prefix, without leading or trailing `/` (empty: the bucket's root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tag the location named, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The key of `relative` (a path inside the layout).
    fn key(&self, relative: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(relative)
        } else {
            Key::from(format!("{}/{relative}", self.prefix))
        }
    }

    fn prefix_key(&self) -> Option<Key> {
        (!self.prefix.is_empty()).then(|| Key::from(self.prefix.as_str()))
    }

    /// The client, configured from the location, the `AWS_*` environment and a profile.
    fn store(&self) -> Result<AmazonS3, LayoutError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(60),
                backoff: Default::default(),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_connect_timeout(CONNECT_TIMEOUT),
            );
        if let Some((id, secret)) = &self.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.0.expose_secret());
        } else if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
            && let Some(profile) = shared_credentials()?
        {
            builder = builder
                .with_access_key_id(profile.access_key_id)
                .with_secret_access_key(profile.secret_access_key);
            if let Some(token) = profile.session_token {
                builder = builder.with_token(token);
            }
        }
        if let Some(endpoint) = &self.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if let Some(path_style) = self.path_style {
            builder = builder.with_virtual_hosted_style_request(!path_style);
        }
        builder
            .build()
            .map_err(|e| LayoutError::InvalidName(format!("{self}: {}", clean(&e))))
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// A secret access key: never printed, wiped when dropped, equal by value (for tests).
#[derive(Debug, Clone)]
struct Redacted(SecretString);

impl PartialEq for Redacted {
    fn eq(&self, other: &Self) -> bool {
        self.0.expose_secret() == other.0.expose_secret()
    }
}

impl Eq for Redacted {}

/// Keys of a profile in the shared credentials file.
struct Profile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// The profile `AWS_PROFILE` (or `default`) of `AWS_SHARED_CREDENTIALS_FILE` (or
/// `~/.aws/credentials`), if the file exists. A named profile that is missing is an error: the
/// operator asked for it.
fn shared_credentials() -> Result<Option<Profile>, LayoutError> {
    let named = std::env::var("AWS_PROFILE").ok();
    let path = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(path) => std::path::PathBuf::from(path),
        None => match std::env::var_os("HOME") {
            Some(home) => std::path::Path::new(&home).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && named.is_none() => return Ok(None),
        Err(e) => {
            return Err(LayoutError::Io {
                path,
                source: e.into(),
            });
        }
    };
    let profile = named.as_deref().unwrap_or("default");
    let keys = profile_keys(&text, profile);
    match (
        keys.get("aws_access_key_id"),
        keys.get("aws_secret_access_key"),
    ) {
        (Some(id), Some(secret)) => Ok(Some(Profile {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: keys.get("aws_session_token").cloned(),
        })),
        _ if named.is_some() => Err(LayoutError::Denied(format!(
            "{}: profile {profile:?} has no aws_access_key_id and aws_secret_access_key",
            path.display()
        ))),
        _ => Ok(None),
    }
}

/// The `key = value` lines of section `[profile]` of an INI file.
fn profile_keys(text: &str, profile: &str) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == profile;
        } else if inside && let Some((key, value)) = line.split_once('=') {
            keys.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    keys
}

/// An object store error in our words: what was refused and what to check, and S3's own
/// error code and message when it sent one, never the raw request (a signature's inputs may be
/// in it).
fn store_error(location: &S3Location, what: &str, error: object_store::Error) -> LayoutError {
    let text = clean(&error);
    let code = s3_element(&text, "Code");
    let denied = matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || matches!(
        code,
        Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken")
    );
    if denied {
        return LayoutError::Denied(format!(
            "{location}: the object store refused access to {what} ({}): check \
             AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy",
            code.unwrap_or("403")
        ));
    }
    if code == Some("NoSuchBucket") {
        return LayoutError::LocationNotFound(format!(
            "{location}: bucket {:?} does not exist",
            location.bucket
        ));
    }
    if let object_store::Error::NotFound { .. } = error {
        return LayoutError::NotFound(format!("{location}: {what} is not there"));
    }
    match (code, s3_element(&text, "Message")) {
        (Some(code), Some(message)) => LayoutError::Store(format!(
            "{location}: {what}: the object store answered {code}: {message}"
        )),
        _ => LayoutError::Store(format!("{location}: {what}: {text}")),
    }
}

/// The text of `<name>...</name>` in an S3 error body quoted in `text`.
fn s3_element<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + text[start..].find(&format!("</{name}>"))?;
    Some(&text[start..end])
}

/// An error's text, on one bounded line.
fn clean(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    crate::text::clean(&text, 400)
}

/// An OCI image layout under an S3 prefix.
#[derive(Debug, Clone)]
pub struct S3Layout {
    location: S3Location,
    store: Arc<AmazonS3>,
}

impl S3Layout {
    /// Opens the layout at `location`, creating its `oci-layout` and `index.json` if the
    /// prefix is empty; refuses a missing bucket, refused credentials, and a prefix that holds
    /// other objects but no `oci-layout` (a mistyped prefix must not scatter blobs).
    pub async fn create(location: &S3Location) -> Result<Self, LayoutError> {
        let layout = Self::connect(location)?;
        let listed = layout
            .store
            .list_with_delimiter(location.prefix_key().as_ref())
            .await
            .map_err(|e| layout.bucket_error(e))?;
        let marker = location.key("oci-layout");
        if listed.objects.iter().any(|o| o.location == marker) {
            layout.check_marker().await?;
        } else if !listed.objects.is_empty() || !listed.common_prefixes.is_empty() {
            return Err(LayoutError::Invalid {
                path: location.to_string().into(),
                detail: "the prefix holds other objects and no oci-layout; name an empty or \
                         new prefix, or an OCI image layout"
                    .into(),
            });
        } else {
            let text = format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}");
            layout.put(&marker, Bytes::from(text), "oci-layout").await?;
        }
        Ok(layout)
    }

    /// Opens an existing layout for reading.
    pub async fn open(location: &S3Location) -> Result<Self, LayoutError> {
        let layout = Self::connect(location)?;
        layout
            .store
            .list_with_delimiter(location.prefix_key().as_ref())
            .await
            .map_err(|e| layout.bucket_error(e))?;
        layout.check_marker().await.map_err(|error| match error {
            LayoutError::NotFound(_) => LayoutError::Invalid {
                path: location.to_string().into(),
                detail: "not an OCI image layout (no oci-layout object)".into(),
            },
            other => other,
        })?;
        Ok(layout)
    }

    fn connect(location: &S3Location) -> Result<Self, LayoutError> {
        Ok(Self {
            location: location.clone(),
            store: Arc::new(location.store()?),
        })
    }

    /// A failed first listing: the bucket is missing, or the credentials are refused.
    fn bucket_error(&self, error: object_store::Error) -> LayoutError {
        match store_error(&self.location, "the bucket", error) {
            LayoutError::NotFound(_) => LayoutError::LocationNotFound(format!(
                "{}: bucket {:?} does not exist",
                self.location, self.location.bucket
            )),
            other => other,
        }
    }

    async fn check_marker(&self) -> Result<(), LayoutError> {
        let bytes = self.get_small("oci-layout", 4096).await?;
        super::check_marker(Path::new(&format!("{}/oci-layout", self.location)), &bytes)
    }

    pub fn location(&self) -> &S3Location {
        &self.location
    }

    fn blob_key(&self, digest: &str) -> Result<Key, LayoutError> {
        Ok(self
            .location
            .key(&format!("blobs/sha256/{}", checked_hex(digest)?)))
    }

    async fn put(&self, key: &Key, bytes: Bytes, what: &str) -> Result<(), LayoutError> {
        self.store
            .put(key, PutPayload::from(bytes))
            .await
            .map_err(|e| store_error(&self.location, what, e))?;
        Ok(())
    }

    /// A small object, refused over `limit` bytes.
    async fn get_small(&self, relative: &str, limit: u64) -> Result<Bytes, LayoutError> {
        let result = self
            .store
            .get(&self.location.key(relative))
            .await
            .map_err(|e| store_error(&self.location, relative, e))?;
        if result.meta.size > limit {
            return Err(LayoutError::Invalid {
                path: format!("{}/{relative}", self.location).into(),
                detail: format!("larger than {limit} bytes"),
            });
        }
        result
            .bytes()
            .await
            .map_err(|e| store_error(&self.location, relative, e))
    }

    /// The size of the blob `digest`, if the layout has it.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, LayoutError> {
        let key = self.blob_key(digest)?;
        match self.store.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(&self.location, &format!("blob {digest}"), e)),
        }
    }

    /// Starts writing the blob `digest` of `size` bytes.
    pub fn begin_blob(&self, digest: &str, size: u64) -> Result<S3BlobSink, LayoutError> {
        Ok(S3BlobSink {
            key: self.blob_key(digest)?,
            layout: self.clone(),
            expected: digest.to_owned(),
            size,
            written: 0,
            hasher: StreamingDigest::default(),
            buffer: Vec::new(),
            upload: None,
        })
    }

    /// Writes a small blob held in memory, checked against `digest` first.
    pub async fn put_blob_bytes(&self, digest: &str, bytes: &[u8]) -> Result<(), LayoutError> {
        if self.blob_size(digest).await? == Some(bytes.len() as u64) {
            return Ok(());
        }
        let mut sink = self.begin_blob(digest, bytes.len() as u64)?;
        sink.write(bytes).await?;
        sink.commit().await
    }

    /// The blob `digest`'s bytes as they are read, and its size.
    pub async fn open_blob(&self, digest: &str) -> Result<(BlobStream, u64), LayoutError> {
        let key = self.blob_key(digest)?;
        let what = format!("blob {digest}");
        let result = self
            .store
            .get(&key)
            .await
            .map_err(|e| store_error(&self.location, &what, e))?;
        let size = result.meta.size;
        let location = self.location.clone();
        let stream = result
            .into_stream()
            .map_err(move |e| store_error(&location, &what, e));
        Ok((stream.boxed(), size))
    }

    /// `index.json` and the version it was read at (`None`: there is none yet).
    pub(super) async fn read_index(&self) -> Result<(Index, Option<UpdateVersion>), LayoutError> {
        let key = self.location.key("index.json");
        let result = match self.store.get(&key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok((Index::empty(), None)),
            Err(e) => return Err(store_error(&self.location, "index.json", e)),
        };
        let path = format!("{}/index.json", self.location);
        if result.meta.size > MAX_INDEX_BYTES {
            return Err(LayoutError::Invalid {
                path: path.into(),
                detail: format!("larger than {MAX_INDEX_BYTES} bytes"),
            });
        }
        let version = UpdateVersion {
            e_tag: result.meta.e_tag.clone(),
            version: result.meta.version.clone(),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(|e| store_error(&self.location, "index.json", e))?;
        Ok((Index::parse(&bytes, path)?, Some(version)))
    }

    /// Points `tag` at `descriptor`: `refs/<tag>`, then `index.json` by compare-and-swap.
    pub async fn set_tag(&self, tag: &str, descriptor: &Descriptor) -> Result<(), LayoutError> {
        check_tag(tag)?;
        match self.blob_size(&descriptor.digest).await? {
            Some(size) if size == descriptor.size => {}
            _ => {
                return Err(LayoutError::Invalid {
                    path: self.location.to_string().into(),
                    detail: format!(
                        "cannot tag {tag}: manifest {} ({} bytes) is not in the layout",
                        descriptor.digest, descriptor.size
                    ),
                });
            }
        }
        let entry = tag_entry(tag, descriptor);
        let json = serde_json::to_vec(&entry).expect("a descriptor serialises");
        self.put(
            &self.location.key(&format!("refs/{tag}")),
            json.into(),
            &format!("refs/{tag}"),
        )
        .await?;
        let key = self.location.key("index.json");
        for attempt in 0..INDEX_TRIES {
            let (mut index, version) = self.read_index().await?;
            index.retag(tag, entry.clone());
            let mode = match version {
                Some(version) => PutMode::Update(version),
                None => PutMode::Create,
            };
            let options = PutOptions {
                mode,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&key, PutPayload::from(index.to_json()), options)
                .await
            {
                Ok(_) => return Ok(()),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => {
                    // Another writer got there first: read its index and try again.
                    let jitter = u64::from(uuid::Uuid::new_v4().as_u128() as u16)
                        % (20 * u64::from(attempt + 1));
                    tokio::time::sleep(Duration::from_millis(5 + jitter)).await;
                }
                Err(e) => return Err(store_error(&self.location, "index.json", e)),
            }
        }
        Err(LayoutError::Store(format!(
            "{}: index.json changed under every one of {INDEX_TRIES} updates; refs/{tag} is \
             written, run the copy again to list it",
            self.location
        )))
    }

    /// What `tag` points at: its `index.json` entry, else its `refs/` object.
    pub async fn resolve(&self, tag: &str) -> Result<Option<Descriptor>, LayoutError> {
        check_tag(tag)?;
        if let Some(entry) = self.read_index().await?.0.tagged(tag) {
            return Ok(Some(entry));
        }
        let relative = format!("refs/{tag}");
        match self.get_small(&relative, MAX_INDEX_BYTES).await {
            Ok(bytes) => {
                Descriptor::parse_ref(&bytes, format!("{}/{relative}", self.location)).map(Some)
            }
            Err(LayoutError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A blob being uploaded: hashed as it goes, given its key only by [`S3BlobSink::commit`].
pub struct S3BlobSink {
    layout: S3Layout,
    key: Key,
    expected: String,
    size: u64,
    written: u64,
    hasher: StreamingDigest,
    /// Bytes not yet in an upload: the whole blob while it is at most [`PART`] bytes.
    buffer: Vec<u8>,
    /// The multipart upload, once the blob outgrew one part.
    upload: Option<WriteMultipart>,
}

impl S3BlobSink {
    fn failed(&self, error: object_store::Error) -> LayoutError {
        store_error(
            &self.layout.location,
            &format!("blob {}", self.expected),
            error,
        )
    }

    /// Appends `chunk`; refuses bytes beyond the declared size.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), LayoutError> {
        self.written += chunk.len() as u64;
        if self.written > self.size {
            return Err(LayoutError::DigestMismatch {
                expected: self.expected.clone(),
                detail: format!("more than the {} bytes declared", self.size),
            });
        }
        self.hasher.update(chunk);
        if self.upload.is_none() && self.buffer.len() + chunk.len() <= PART {
            if self.buffer.capacity() == 0 {
                // Exactly what the blob (or its first part) needs, not a doubling past it.
                self.buffer
                    .reserve_exact(self.size.min(PART as u64) as usize);
            }
            self.buffer.extend_from_slice(chunk);
            return Ok(());
        }
        if self.upload.is_none() {
            let upload = self
                .layout
                .store
                .put_multipart(&self.key)
                .await
                .map_err(|e| self.failed(e))?;
            let mut upload = WriteMultipart::new_with_chunk_size(upload, PART);
            upload.write(&std::mem::take(&mut self.buffer));
            self.upload = Some(upload);
        }
        let upload = self.upload.as_mut().expect("started above");
        // A part fills only once the previous one is uploaded: one part's memory per blob.
        // (With one in flight while the next fills, an export of eight large blobs at once
        // peaked at 120 MiB against the peers' 88; other blobs keep the link busy meanwhile.)
        if let Err(e) = upload.wait_for_capacity(0).await {
            return Err(self.failed(e));
        }
        self.upload.as_mut().expect("started above").write(chunk);
        Ok(())
    }

    /// Checks size and digest, and only then completes the upload (or `PUT`s the bytes).
    pub async fn commit(mut self) -> Result<(), LayoutError> {
        if self.written != self.size {
            return Err(LayoutError::DigestMismatch {
                expected: self.expected.clone(),
                detail: format!("{} of {} bytes written", self.written, self.size),
            });
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.expected {
            return Err(LayoutError::DigestMismatch {
                expected: self.expected.clone(),
                detail: format!("the content hashes to {actual}"),
            });
        }
        match self.upload.take() {
            Some(upload) => {
                upload.finish().await.map_err(|e| self.failed(e))?;
            }
            None => {
                let bytes = Bytes::from(std::mem::take(&mut self.buffer));
                let what = format!("blob {}", self.expected);
                self.layout.put(&self.key, bytes, &what).await?;
            }
        }
        Ok(())
    }
}

impl Drop for S3BlobSink {
    fn drop(&mut self) {
        // Not committed: abort the upload, so its parts are not kept (and billed) for nothing.
        if let Some(upload) = self.upload.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(error) = upload.abort().await {
                    tracing::warn!(%error, "aborting an unfinished multipart upload failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_with_their_tag_and_settings() {
        let location = S3Location::parse(
            "s3://images-bucket/exports/site-a:v1?endpoint=http://127.0.0.1:8333/&region=eu-west-1&path_style=true",
        )
        .unwrap();
        assert_eq!(location.to_string(), "s3://images-bucket/exports/site-a");
        assert_eq!(location.tag(), Some("v1"));
        assert_eq!(location.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(location.region.as_deref(), Some("eu-west-1"));
        assert_eq!(location.path_style, Some(true));
        assert_eq!(
            location.key("index.json").as_ref(),
            "exports/site-a/index.json"
        );
        let root = S3Location::parse("s3://bucket").unwrap();
        assert_eq!(
            (root.to_string().as_str(), root.tag()),
            ("s3://bucket", None)
        );
        assert_eq!(root.key("index.json").as_ref(), "index.json");
    }

    #[test]
    fn credentials_and_escapes_are_refused_in_a_location() {
        for (text, expected) in [
            (
                "s3://AKIA:secret@bucket/x",
                "credentials never go in the location",
            ),
            (
                "s3://bucket/x?secret_access_key=s",
                "credentials never go in the location",
            ),
            ("s3://bucket/../x", "the prefix is"),
            ("s3://bucket/a//b", "the prefix is"),
            ("s3://Bucket/x", "the bucket name"),
            ("s3://b/x", "the bucket name"),
            ("s3://bucket/x:../t", "is not a tag"),
            ("s3://bucket/x?endpoint=ftp://h", "endpoint must be"),
            ("s3://bucket/x?colour=blue", "the query takes"),
            ("oci:/x", "not an s3:// location"),
        ] {
            let error = S3Location::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(
                !error.contains("secret"),
                "the secret is not echoed: {error}"
            );
        }
    }

    #[test]
    fn s3_error_bodies_are_read_for_their_code_and_message() {
        let text = "GET http://h/b failed - 404 Not Found: <?xml version=\"1.0\"?><Error>\
                    <Code>NoSuchBucket</Code><Message>The specified bucket does not exist\
                    </Message></Error>";
        assert_eq!(s3_element(text, "Code"), Some("NoSuchBucket"));
        assert_eq!(
            s3_element(text, "Message"),
            Some("The specified bucket does not exist")
        );
        assert_eq!(s3_element("no body", "Code"), None);
        assert_eq!(s3_element("<Code>unterminated", "Code"), None);
    }

    #[test]
    fn a_profile_is_read_from_its_own_section_only() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    [site]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token = T\n";
        let site = profile_keys(text, "site");
        assert_eq!(site.get("aws_access_key_id").map(String::as_str), Some("C"));
        assert_eq!(site.get("aws_session_token").map(String::as_str), Some("T"));
        assert_eq!(
            profile_keys(text, "default")
                .get("aws_secret_access_key")
                .map(String::as_str),
            Some("B")
        );
        assert!(profile_keys(text, "missing").is_empty());
    }
}
