//! Pushing test images with plain HTTP calls (the distribution API, monolithic uploads).
//!
//! Deliberately independent of tailor's own registry client, so a bug there cannot hide in
//! the test set-up. [`PushOptions`] adds what a registry behind a load balancer needs: HTTPS
//! with a test CA, and retries of the steps that may meet an instance that just died.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Body, Client, RequestBuilder, StatusCode};

use crate::image::{Blob, BlobData, BuiltImage, BuiltIndex};

/// How to reach the registry, beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// A PEM CA certificate to trust, for an HTTPS registry whose certificate a test CA signed.
    pub ca_pem: Option<PathBuf>,
    /// How many times a failed step is tried again when the failure is one a load balancer
    /// shows while an instance dies: a connection error, or 502, 503 or 504. A blob upload is
    /// retried from its HEAD (a new upload session), a manifest PUT as it is (PUT is
    /// idempotent). 0: fail at once, as [`push_image`] does.
    pub retries: u32,
}

impl PushOptions {
    /// An HTTPS registry signed by the CA in `ca_pem`, with retries for about 10 seconds.
    pub fn https(ca_pem: impl Into<PathBuf>) -> Self {
        Self {
            ca_pem: Some(ca_pem.into()),
            retries: 5,
        }
    }

    /// The HTTP client these options describe.
    pub fn client(&self) -> Client {
        crate::init();
        let mut builder = Client::builder();
        if let Some(path) = &self.ca_pem {
            let pem = std::fs::read(path)
                .unwrap_or_else(|e| panic!("read the CA certificate {}: {e}", path.display()));
            let certificate = reqwest::Certificate::from_pem(&pem)
                .unwrap_or_else(|e| panic!("{} is not a PEM certificate: {e}", path.display()));
            builder = builder.add_root_certificate(certificate);
        }
        builder.build().expect("an HTTP client")
    }
}

/// A failure worth another try: the registry behind a load balancer may have just died.
#[derive(Debug)]
struct Transient(String);

fn transient_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Runs `step` until it succeeds or `retries` more attempts failed transiently. The pauses
/// (0.5 s, doubling, at most 4 s) outlast a load balancer's window for a dead instance: nginx
/// answers 502 "no live upstreams" while every instance has failed within its `fail_timeout`,
/// e.g. when one dies soon after another came back but before nginx tried it again.
async fn with_retries<F, Fut>(what: &str, retries: u32, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Transient>>,
{
    let mut attempt = 0;
    loop {
        match step().await {
            Ok(()) => return,
            Err(Transient(error)) if attempt < retries => {
                attempt += 1;
                eprintln!("{what}: {error}; retrying ({attempt}/{retries})");
                let pause = Duration::from_millis(500 << (attempt - 1).min(3));
                tokio::time::sleep(pause).await;
            }
            Err(Transient(error)) => panic!("{what}: {error} (after {attempt} retries)"),
        }
    }
}

/// How to authenticate a push.
#[derive(Debug, Clone)]
pub enum PushAuth {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

impl PushAuth {
    fn apply(&self, request: RequestBuilder) -> RequestBuilder {
        match self {
            Self::Anonymous => request,
            Self::Basic(user, password) => request.basic_auth(user, Some(password)),
            Self::Bearer(token) => request.header(AUTHORIZATION, format!("Bearer {token}")),
        }
    }
}

/// Pushes `image` to `base_url` as `repository:tag`; returns the manifest digest.
pub async fn push_image(
    base_url: &str,
    repository: &str,
    tag: &str,
    image: &BuiltImage,
    auth: &PushAuth,
) -> String {
    push_image_with(
        base_url,
        repository,
        tag,
        image,
        auth,
        &PushOptions::default(),
    )
    .await
}

/// [`push_image`] with a CA to trust and retries.
pub async fn push_image_with(
    base_url: &str,
    repository: &str,
    tag: &str,
    image: &BuiltImage,
    auth: &PushAuth,
    options: &PushOptions,
) -> String {
    let client = options.client();
    for blob in image.blobs() {
        push_blob_with(&client, base_url, repository, blob, auth, options.retries).await;
    }
    push_manifest_with(
        &client,
        base_url,
        repository,
        tag,
        &image.manifest,
        image.media_type,
        auth,
        options.retries,
    )
    .await;
    image.digest.clone()
}

/// Pushes every child by digest, then the index as `repository:tag`; returns the index digest.
pub async fn push_index(
    base_url: &str,
    repository: &str,
    tag: &str,
    index: &BuiltIndex,
    auth: &PushAuth,
) -> String {
    push_index_with(
        base_url,
        repository,
        tag,
        index,
        auth,
        &PushOptions::default(),
    )
    .await
}

/// [`push_index`] with a CA to trust and retries.
pub async fn push_index_with(
    base_url: &str,
    repository: &str,
    tag: &str,
    index: &BuiltIndex,
    auth: &PushAuth,
    options: &PushOptions,
) -> String {
    let client = options.client();
    for child in &index.children {
        for blob in child.blobs() {
            push_blob_with(&client, base_url, repository, blob, auth, options.retries).await;
        }
        push_manifest_with(
            &client,
            base_url,
            repository,
            &child.digest,
            &child.manifest,
            child.media_type,
            auth,
            options.retries,
        )
        .await;
    }
    push_manifest_with(
        &client,
        base_url,
        repository,
        tag,
        &index.manifest,
        index.media_type,
        auth,
        options.retries,
    )
    .await;
    index.digest.clone()
}

/// Uploads `blob` unless the registry already has it.
pub async fn push_blob(
    client: &Client,
    base_url: &str,
    repository: &str,
    blob: &Blob,
    auth: &PushAuth,
) {
    push_blob_with(client, base_url, repository, blob, auth, 0).await;
}

/// [`push_blob`], starting again from the HEAD after a transient failure, up to `retries`
/// times.
pub async fn push_blob_with(
    client: &Client,
    base_url: &str,
    repository: &str,
    blob: &Blob,
    auth: &PushAuth,
    retries: u32,
) {
    let what = format!("upload {} to {repository}", blob.digest);
    with_retries(&what, retries, || {
        try_push_blob(client, base_url, repository, blob, auth)
    })
    .await;
}

async fn try_push_blob(
    client: &Client,
    base_url: &str,
    repository: &str,
    blob: &Blob,
    auth: &PushAuth,
) -> Result<(), Transient> {
    let send_error = |step: &str, e: reqwest::Error| Transient(format!("{step}: {e}"));
    let head = auth
        .apply(client.head(format!("{base_url}/v2/{repository}/blobs/{}", blob.digest)))
        .send()
        .await
        .map_err(|e| send_error("HEAD blob", e))?;
    if head.status() == StatusCode::OK {
        return Ok(());
    }
    if transient_status(head.status()) {
        return Err(Transient(format!("HEAD blob: {}", head.status())));
    }
    let started = auth
        .apply(client.post(format!("{base_url}/v2/{repository}/blobs/uploads/")))
        .send()
        .await
        .map_err(|e| send_error("start an upload", e))?;
    if transient_status(started.status()) {
        return Err(Transient(format!("start an upload: {}", started.status())));
    }
    assert_eq!(
        started.status(),
        StatusCode::ACCEPTED,
        "start upload: {:?}",
        started.text().await
    );
    let location = started.headers()[LOCATION]
        .to_str()
        .expect("ASCII Location")
        .to_owned();
    let location = if location.starts_with('/') {
        format!("{base_url}{location}")
    } else {
        location
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let body = match &blob.data {
        BlobData::Memory(bytes) => Body::from(bytes.clone()),
        BlobData::File(path) => {
            let file = tokio::fs::File::open(path.as_ref() as &std::path::Path)
                .await
                .expect("open the layer file");
            Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20))
        }
    };
    let put = auth
        .apply(client.put(format!("{location}{separator}digest={}", blob.digest)))
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, blob.size)
        .body(body)
        .send()
        .await
        .map_err(|e| send_error("upload the blob", e))?;
    if transient_status(put.status()) {
        return Err(Transient(format!("upload the blob: {}", put.status())));
    }
    assert_eq!(
        put.status(),
        StatusCode::CREATED,
        "upload {}: {:?}",
        blob.digest,
        put.text().await
    );
    Ok(())
}

/// Puts manifest bytes, unchanged, under `reference` (a tag or a digest).
pub async fn push_manifest(
    client: &Client,
    base_url: &str,
    repository: &str,
    reference: &str,
    bytes: &bytes::Bytes,
    media_type: &str,
    auth: &PushAuth,
) {
    push_manifest_with(
        client, base_url, repository, reference, bytes, media_type, auth, 0,
    )
    .await;
}

/// [`push_manifest`], tried again after a transient failure, up to `retries` times.
#[allow(clippy::too_many_arguments)]
pub async fn push_manifest_with(
    client: &Client,
    base_url: &str,
    repository: &str,
    reference: &str,
    bytes: &bytes::Bytes,
    media_type: &str,
    auth: &PushAuth,
    retries: u32,
) {
    let what = format!("put manifest {repository}:{reference}");
    with_retries(&what, retries, || async {
        let response = auth
            .apply(client.put(format!("{base_url}/v2/{repository}/manifests/{reference}")))
            .header(CONTENT_TYPE, media_type)
            .body(bytes.clone())
            .send()
            .await
            .map_err(|e| Transient(e.to_string()))?;
        if transient_status(response.status()) {
            return Err(Transient(response.status().to_string()));
        }
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "put manifest {repository}:{reference}: {:?}",
            response.text().await
        );
        Ok(())
    })
    .await;
}
