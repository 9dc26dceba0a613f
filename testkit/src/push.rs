//! Pushing test images with plain HTTP calls (the distribution API, monolithic uploads).
//!
//! Deliberately independent of tailor's own registry client, so a bug there cannot hide in
//! the test set-up.

use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Body, Client, RequestBuilder, StatusCode};

use crate::image::{Blob, BlobData, BuiltImage, BuiltIndex};

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
    let client = Client::new();
    for blob in image.blobs() {
        push_blob(&client, base_url, repository, blob, auth).await;
    }
    push_manifest(
        &client,
        base_url,
        repository,
        tag,
        &image.manifest,
        image.media_type,
        auth,
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
    let client = Client::new();
    for child in &index.children {
        for blob in child.blobs() {
            push_blob(&client, base_url, repository, blob, auth).await;
        }
        push_manifest(
            &client,
            base_url,
            repository,
            &child.digest,
            &child.manifest,
            child.media_type,
            auth,
        )
        .await;
    }
    push_manifest(
        &client,
        base_url,
        repository,
        tag,
        &index.manifest,
        index.media_type,
        auth,
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
    let head = auth
        .apply(client.head(format!("{base_url}/v2/{repository}/blobs/{}", blob.digest)))
        .send()
        .await
        .expect("HEAD blob");
    if head.status() == StatusCode::OK {
        return;
    }
    let started = auth
        .apply(client.post(format!("{base_url}/v2/{repository}/blobs/uploads/")))
        .send()
        .await
        .expect("start an upload");
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
        .expect("upload the blob");
    assert_eq!(
        put.status(),
        StatusCode::CREATED,
        "upload {}: {:?}",
        blob.digest,
        put.text().await
    );
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
    let response = auth
        .apply(client.put(format!("{base_url}/v2/{repository}/manifests/{reference}")))
        .header(CONTENT_TYPE, media_type)
        .body(bytes.clone())
        .send()
        .await
        .expect("put the manifest");
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "put manifest {repository}:{reference}: {:?}",
        response.text().await
    );
}
