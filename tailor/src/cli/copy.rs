//! `tailor copy SRC DST`: one image copy from the command line, with progress bars on a
//! terminal and `--json` for machines.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal};
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tailor::copy::{
    CopyOptions, PlatformChoice, Progress, ProgressSink, Source, Wanted, copy_from,
    copy_to_archive, copy_to_layout,
};
use tailor::error::CopyError;
use tailor::layout::{Layout, OciArchive, OciDir, S3Layout, S3Location};
use tailor::platform::Platform;
use tailor::reference::ImageReference;
use tailor::registry::{Credentials, Registries, RetryPolicy};

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Image to copy: a registry reference (redis:7, registry.example:5000/team/app@sha256:...,
    /// docker:// optional) or an OCI image layout (oci:DIR[:TAG], oci-archive:FILE[:TAG] or
    /// s3://BUCKET/PREFIX[:TAG]; without a tag, its only image).
    pub source: String,
    /// Where to put it: a registry (registry.internal:5000/apps/web:v1, docker:// optional)
    /// or an OCI image layout in a directory (oci:DIR[:TAG]), a tar file
    /// (oci-archive:FILE[:TAG], written whole) or a bucket
    /// (s3://BUCKET/PREFIX[:TAG][?endpoint=URL&region=R]); a layout's tag is `latest` if none.
    pub destination: String,
    /// Platform to copy out of a multi-platform image.
    #[arg(long, default_value = "linux/amd64", conflicts_with = "all_platforms")]
    pub platform: String,
    /// Copy the whole index and every platform's image.
    #[arg(long)]
    pub all_platforms: bool,
    /// Also copy what refers to the image: signatures, SBOMs and attestations, found through
    /// the OCI referrers API, its `sha256-<hex>` fallback tag and cosign's `.sig`, `.att` and
    /// `.sbom` tags, and written by the fallback tags (registry to registry only).
    #[arg(long)]
    pub referrers: bool,
    /// Registry (host:port) to speak plain HTTP to; repeatable.
    #[arg(
        long = "insecure",
        value_name = "HOST",
        env = "TAILOR_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure: Vec<String>,
    /// Source credentials USER[:PASS]; without :PASS the password comes from
    /// TAILOR_SRC_PASSWORD or, with --src-password-stdin, from standard input.
    #[arg(long, value_name = "USER[:PASS]")]
    pub src_creds: Option<String>,
    /// Destination credentials USER[:PASS]; without :PASS, TAILOR_DST_PASSWORD or stdin.
    #[arg(long, value_name = "USER[:PASS]")]
    pub dst_creds: Option<String>,
    /// Read the source password from the first line of standard input.
    #[arg(long)]
    pub src_password_stdin: bool,
    /// Read the destination password from standard input (after the source's, if both).
    #[arg(long)]
    pub dst_password_stdin: bool,
    /// Parallel blob transfers.
    #[arg(long, default_value_t = tailor::copy::DEFAULT_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// PEM certificates to trust besides the system's (a registry with its own CA).
    #[arg(long, value_name = "FILE", env = "TAILOR_CA_CERTIFICATES")]
    pub ca_certificates: Option<std::path::PathBuf>,
    /// Registry meant by references without a host.
    #[arg(long, env = "TAILOR_DEFAULT_REGISTRY", default_value = "docker.io")]
    pub default_registry: String,
    /// Longest a request other than a blob stream may take, in seconds (a blob stream fails
    /// when it moves too slowly instead).
    #[arg(long, value_name = "SECONDS", env = "TAILOR_REQUEST_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout: u64,
    /// Print one JSON object (the report, or {"error": {code, message}}) and no progress.
    #[arg(long)]
    pub json: bool,
}

/// Runs the copy; returns the process exit code.
pub async fn run(args: CopyArgs) -> i32 {
    match execute(&args).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serialises")
                );
            } else {
                println!("pinned:  {}", report.pinned);
                println!("tagged:  {}", report.tagged);
                println!(
                    "blobs:   {} copied ({}), {} mounted, {} already present",
                    report.blobs.copied,
                    indicatif::HumanBytes(report.bytes_copied),
                    report.blobs.mounted,
                    report.blobs.skipped
                );
                for referrer in &report.referrers {
                    println!(
                        "referrer: {} {}",
                        referrer.digest,
                        referrer
                            .tag
                            .as_deref()
                            .or(referrer.artifact_type.as_deref())
                            .unwrap_or(&referrer.media_type)
                    );
                }
                for warning in &report.warnings {
                    eprintln!("warning: {warning}");
                }
                if !report.foreign_layers.is_empty() {
                    println!(
                        "skipped non-distributable layers: {}",
                        report.foreign_layers.join(", ")
                    );
                }
            }
            0
        }
        Err(error) => {
            if args.json {
                let body = serde_json::json!({ "error": { "code": error.code(), "message": error.to_string() } });
                println!("{body}");
            } else {
                eprintln!("error: {error} ({})", error.code());
            }
            1
        }
    }
}

/// One end of a copy.
#[derive(Debug, PartialEq)]
pub(super) enum Location {
    /// `[docker://]host/repository:tag` (a source may name a digest).
    Registry(ImageReference),
    /// `oci:DIR[:TAG]`: an OCI image layout (containers/image's syntax: DIR ends at the first
    /// `:`). Without a tag, a source is the layout's only image and a destination is `latest`.
    Layout {
        dir: std::path::PathBuf,
        tag: Option<String>,
    },
    /// `s3://BUCKET/PREFIX[:TAG][?endpoint=URL&region=R&path_style=BOOL]`: an OCI image layout
    /// in a bucket.
    Bucket(S3Location),
    /// `oci-archive:FILE[:TAG]`: an OCI image layout in a tar file.
    Archive {
        file: std::path::PathBuf,
        tag: Option<String>,
    },
}

impl Location {
    pub(super) fn parse(arg: &str, default_registry: &str) -> Result<Self, CopyError> {
        if let Some(rest) = arg.strip_prefix("oci-archive:") {
            let (file, tag) = match rest.split_once(':') {
                Some((file, tag)) => (file, Some(tag)),
                None => (rest, None),
            };
            if file.is_empty() {
                return Err(CopyError::InvalidArgument(format!(
                    "{arg}: name the archive, as in oci-archive:FILE[:TAG]"
                )));
            }
            if let Some(tag) = tag {
                tailor::layout::check_tag(tag).map_err(CopyError::Layout)?;
            }
            return Ok(Self::Archive {
                file: file.into(),
                tag: tag.map(str::to_owned),
            });
        }
        if let Some(rest) = arg.strip_prefix("oci:") {
            let (dir, tag) = match rest.split_once(':') {
                Some((dir, tag)) => (dir, Some(tag)),
                None => (rest, None),
            };
            if dir.is_empty() {
                return Err(CopyError::InvalidArgument(format!(
                    "{arg}: name the layout's directory, as in oci:DIR[:TAG]"
                )));
            }
            if let Some(tag) = tag {
                tailor::layout::check_tag(tag).map_err(CopyError::Layout)?;
            }
            return Ok(Self::Layout {
                dir: dir.into(),
                tag: tag.map(str::to_owned),
            });
        }
        if arg.starts_with("s3://") {
            return Ok(Self::Bucket(
                S3Location::parse(arg).map_err(CopyError::Layout)?,
            ));
        }
        if let Some((transport, _)) = arg.split_once(':')
            && matches!(transport, "dir" | "docker-archive")
        {
            return Err(CopyError::InvalidArgument(format!(
                "{arg}: {transport}: locations are not supported; use a registry reference \
                 (docker://host/repo:tag) or an OCI layout (oci:DIR[:TAG], \
                 oci-archive:FILE[:TAG] or s3://BUCKET/PREFIX[:TAG])"
            )));
        }
        let reference = arg.strip_prefix("docker://").unwrap_or(arg);
        Ok(Self::Registry(ImageReference::parse_with_default(
            reference,
            default_registry,
        )?))
    }

    /// This location as a destination: a registry is named by tag, a layout defaults to
    /// `latest`.
    fn parse_destination(arg: &str, default_registry: &str) -> Result<Self, CopyError> {
        match Self::parse(arg, default_registry)? {
            Self::Registry(reference) if reference.digest.is_some() => {
                Err(CopyError::InvalidArgument(format!(
                    "{reference}: a destination is named by tag; its digest is the result of the copy"
                )))
            }
            Self::Layout { dir, tag: None } => Ok(Self::Layout {
                dir,
                tag: Some("latest".into()),
            }),
            Self::Archive { file, tag: None } => Ok(Self::Archive {
                file,
                tag: Some("latest".into()),
            }),
            location => Ok(location),
        }
    }
}

impl Location {
    /// The tag a layout location names, if any.
    pub(super) fn tag(&self) -> Option<String> {
        match self {
            Self::Registry(_) => None,
            Self::Layout { tag, .. } | Self::Archive { tag, .. } => tag.clone(),
            Self::Bucket(location) => location.tag().map(str::to_owned),
        }
    }

    /// Why `--src-creds`/`--dst-creds` do not apply to this layout location.
    fn takes_no_credentials(&self) -> &'static str {
        match self {
            Self::Bucket(_) => {
                "a bucket's credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or AWS_PROFILE"
            }
            Self::Archive { .. } => "an OCI archive takes no credentials",
            _ => "an OCI layout takes no credentials",
        }
    }

    /// Opens this layout location: to read from (`create` false: it must exist), or to write
    /// into (created if missing). An archive opens only to read; it is written whole.
    pub(super) async fn open_layout(self, create: bool) -> Result<Layout, CopyError> {
        let blocking = |open: Box<
            dyn FnOnce() -> Result<Layout, tailor::layout::LayoutError> + Send,
        >| async move {
            tokio::task::spawn_blocking(open)
                .await
                .expect("opening a layout does not panic")
                .map_err(CopyError::Layout)
        };
        match self {
            Self::Registry(reference) => Err(CopyError::InvalidArgument(format!(
                "{reference}: a registry, not an OCI layout (oci:DIR, oci-archive:FILE or \
                 s3://BUCKET/PREFIX)"
            ))),
            Self::Layout { dir, .. } if create => {
                blocking(Box::new(move || OciDir::create(&dir).map(Layout::from))).await
            }
            Self::Layout { dir, .. } => {
                blocking(Box::new(move || OciDir::open(&dir).map(Layout::from))).await
            }
            Self::Archive { file, .. } => {
                blocking(Box::new(move || OciArchive::open(&file).map(Layout::from))).await
            }
            Self::Bucket(location) if create => Ok(S3Layout::create(&location)
                .await
                .map_err(CopyError::Layout)?
                .into()),
            Self::Bucket(location) => Ok(S3Layout::open(&location)
                .await
                .map_err(CopyError::Layout)?
                .into()),
        }
    }
}

async fn execute(args: &CopyArgs) -> Result<tailor::copy::CopyReport, CopyError> {
    let source = Location::parse(&args.source, &args.default_registry)?;
    let destination = Location::parse_destination(&args.destination, &args.default_registry)?;
    let platforms = if args.all_platforms {
        PlatformChoice::All
    } else {
        PlatformChoice::One(
            Platform::parse(&args.platform)
                .map_err(|e| CopyError::InvalidArgument(e.to_string()))?,
        )
    };
    let mut stdin_lines = std::io::stdin().lock().lines();
    let mut read_stdin = || {
        stdin_lines
            .next()
            .and_then(Result::ok)
            .map(|l| l.trim_end_matches('\r').to_owned())
    };
    let src_credentials = credentials(
        &args.src_creds,
        "TAILOR_SRC_PASSWORD",
        args.src_password_stdin,
        &mut read_stdin,
    )?;
    let dst_credentials = credentials(
        &args.dst_creds,
        "TAILOR_DST_PASSWORD",
        args.dst_password_stdin,
        &mut read_stdin,
    )?;
    let insecure = insecure_hosts(&args.insecure)?;
    let roots = match &args.ca_certificates {
        Some(path) => std::fs::read(path).map_err(|e| {
            CopyError::InvalidArgument(format!("--ca-certificates {}: {e}", path.display()))
        })?,
        None => Vec::new(),
    };
    // The operator's own command: no egress policy, and patient with rate limits (nobody
    // else would schedule a retry).
    let registries = Registries::new(
        insecure,
        tailor::egress::Egress::unrestricted(),
        tailor::registry::Limits {
            request_timeout: std::time::Duration::from_secs(args.request_timeout),
            ..tailor::registry::Limits::default()
        },
        &roots,
    )
    .map_err(|e| CopyError::InvalidArgument(format!("--ca-certificates: {e}")))?
    .with_retry(RetryPolicy::patient());
    let src = match source {
        Location::Registry(reference) => {
            let repository = registries
                .source(
                    &reference.registry,
                    reference.endpoint(),
                    src_credentials,
                    None,
                )
                .repository(&reference.repository);
            (Source::registry(repository), Wanted::image(&reference))
        }
        location => {
            if src_credentials.is_some() {
                return Err(CopyError::InvalidArgument(format!(
                    "--src-creds: {}",
                    location.takes_no_credentials()
                )));
            }
            let tag = location.tag();
            let layout = location.open_layout(false).await?;
            let wanted = Wanted::in_layout(&layout, tag.as_deref());
            (Source::layout(layout), wanted)
        }
    };
    let show_progress = !args.json && std::io::stderr().is_terminal();
    let options = CopyOptions {
        platforms,
        concurrency: usize::from(args.concurrency),
        progress: show_progress.then(progress_bars),
        referrers: args.referrers,
        ..CopyOptions::default()
    };
    let (source, wanted) = src;
    if args.referrers && source.repository().is_none() {
        return Err(CopyError::InvalidArgument(
            "--referrers copies between registries only; the source is a layout".into(),
        ));
    }
    match destination {
        Location::Registry(destination) => {
            // Reached like a source (by its endpoint), with its own credentials.
            let dst = registries
                .source(
                    &destination.registry,
                    destination.endpoint(),
                    dst_credentials,
                    None,
                )
                .repository(&destination.repository);
            let tag = destination.tag_or_latest();
            copy_from(&source, &wanted, &dst, tag, &options).await
        }
        location => {
            if dst_credentials.is_some() {
                return Err(CopyError::InvalidArgument(format!(
                    "--dst-creds: {}",
                    location.takes_no_credentials()
                )));
            }
            let tag = location.tag().unwrap_or_else(|| "latest".into());
            match location {
                Location::Archive { file, .. } => {
                    copy_to_archive(&source, &wanted, &file, &tag, &options).await
                }
                location => {
                    let layout = location.open_layout(true).await?;
                    copy_to_layout(&source, &wanted, &layout, &tag, &options).await
                }
            }
        }
    }
}

/// `--insecure` entries: `host:port` each. A URL is refused with what to write instead.
fn insecure_hosts(entries: &[String]) -> Result<Vec<String>, CopyError> {
    entries
        .iter()
        .map(|entry| entry.trim())
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            if let Some((scheme, rest)) = entry.split_once("://") {
                return Err(CopyError::InvalidArgument(format!(
                    "--insecure takes host:port, not a URL: write {:?} (listing a registry there \
                     is what makes tailor speak plain HTTP to it; {scheme}:// is implied)",
                    rest.trim_end_matches('/')
                )));
            }
            tailor::config::parse_host_port("--insecure", entry)
                .map_err(|e| CopyError::InvalidArgument(e.to_string()))?;
            Ok(entry.to_owned())
        })
        .collect()
}

fn credentials(
    spec: &Option<String>,
    password_env: &str,
    from_stdin: bool,
    read_stdin: &mut impl FnMut() -> Option<String>,
) -> Result<Option<Credentials>, CopyError> {
    let Some(spec) = spec else { return Ok(None) };
    let invalid = |problem: &str| CopyError::InvalidArgument(format!("credentials: {problem}"));
    let (user, password) = match spec.split_once(':') {
        Some((user, password)) => (user.to_owned(), password.to_owned()),
        None if from_stdin => (
            spec.clone(),
            read_stdin().ok_or_else(|| invalid("no password on standard input"))?,
        ),
        None => (
            spec.clone(),
            std::env::var(password_env).map_err(|_| {
                invalid(&format!(
                    "no password: give USER:PASS, set {password_env}, or use --*-password-stdin"
                ))
            })?,
        ),
    };
    if user.is_empty() {
        return Err(invalid("the user name is empty"));
    }
    Ok(Some(Credentials::new(user, password)))
}

/// A total bar and one bar per blob in flight, drawn on stderr.
fn progress_bars() -> ProgressSink {
    let multi = MultiProgress::new();
    let total = multi.add(ProgressBar::new(0));
    total.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    total.set_prefix("total");
    let blob_style = ProgressStyle::with_template("{prefix:>8} [{bar:40}] {bytes}/{total_bytes}")
        .expect("valid template")
        .progress_chars("=> ");
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    Arc::new(move |event| match event {
        Progress::Planned { blobs, bytes } => {
            total.set_length(bytes);
            total.set_message(format!("{blobs} blobs"));
        }
        Progress::BlobStarted { digest, size } => {
            let bar = multi.add(ProgressBar::new(size));
            bar.set_style(blob_style.clone());
            bar.set_prefix(digest.trim_start_matches("sha256:")[..8].to_owned());
            bars.lock().expect("not poisoned").insert(digest, bar);
        }
        Progress::BlobBytes { digest, bytes } => {
            total.inc(bytes);
            if let Some(bar) = bars.lock().expect("not poisoned").get(&digest) {
                bar.inc(bytes);
            }
        }
        Progress::BlobFinished {
            digest,
            size,
            outcome,
        } => {
            if let Some(bar) = bars.lock().expect("not poisoned").remove(&digest) {
                bar.finish_and_clear();
            }
            if outcome != tailor::copy::BlobOutcome::Copied {
                total.inc(size);
            }
            if total.position() >= total.length().unwrap_or(0) {
                total.finish_and_clear();
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arg: &str) -> Result<Location, String> {
        Location::parse_destination(arg, "docker.io").map_err(|e| e.to_string())
    }

    #[test]
    fn destinations_name_a_registry_or_a_layout() {
        assert_eq!(
            parse("oci:/srv/images:v1").unwrap(),
            Location::Layout {
                dir: "/srv/images".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            parse("oci:out").unwrap(),
            Location::Layout {
                dir: "out".into(),
                tag: Some("latest".into())
            }
        );
        let Location::Registry(reference) = parse("docker://127.0.0.1:5000/apps/web:v1").unwrap()
        else {
            panic!("a registry")
        };
        assert_eq!(reference.registry, "127.0.0.1:5000");
        assert!(
            parse("oci::v1")
                .unwrap_err()
                .contains("name the layout's directory")
        );
        assert!(parse("oci:/srv:../x").unwrap_err().contains("is not a tag"));
        assert!(matches!(
            parse("s3://bucket/prefix:v1").unwrap(),
            Location::Bucket(location) if location.tag() == Some("v1")
        ));
        assert!(
            parse("s3://key:secret@bucket/prefix")
                .unwrap_err()
                .contains("credentials never go in the location")
        );
        assert_eq!(
            parse("oci-archive:out/x.tar").unwrap(),
            Location::Archive {
                file: "out/x.tar".into(),
                tag: Some("latest".into())
            }
        );
        assert!(
            parse("docker-archive:x.tar")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            parse("127.0.0.1:5000/apps/web@sha256:0000000000000000000000000000000000000000000000000000000000000000")
                .unwrap_err()
                .contains("named by tag")
        );
    }

    #[test]
    fn a_source_layout_without_a_tag_means_its_only_image() {
        assert_eq!(
            Location::parse("oci:/srv/export", "docker.io").unwrap(),
            Location::Layout {
                dir: "/srv/export".into(),
                tag: None
            }
        );
    }
}
