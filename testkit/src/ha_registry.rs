//! The internal registry in its highly available shape, for tests: N distribution instances
//! sharing one S3 bucket (SeaweedFS) and one `http.secret`, behind a TLS-terminating nginx
//! load balancer. Clients speak HTTPS to the load balancer only; tests may also reach each
//! instance directly over plain HTTP, kill one (SIGKILL, like a crash) and bring it back on the
//! same port with the same configuration.

use tailor::config::Secret;
use tailor::embedded::{EmbeddedRegistry, RegistryOptions, RegistryStorage};

use crate::access_log::{self, AccessLogEntry};
use crate::load_balancer::LoadBalancer;
use crate::s3::S3Server;

/// The key prefix the instances keep everything under, as the BOSH job's default `/tailor`.
pub const ROOT_DIRECTORY: &str = "tailor";

struct Instance {
    registry: EmbeddedRegistry,
    /// What it was started with, port included, so a restart is the same instance again.
    options: RegistryOptions,
    /// The access logs of its earlier incarnations (a restart starts a new log).
    earlier_requests: Vec<AccessLogEntry>,
}

/// One bucket, N registries, one load balancer; all stopped and deleted on drop.
pub struct HaRegistry {
    // Declared in the order they stop: the load balancer, the registries, then their storage.
    load_balancer: LoadBalancer,
    instances: Vec<Instance>,
    s3: S3Server,
}

impl HaRegistry {
    /// Starts the S3 server, `instances` registries on it and the load balancer over them.
    pub fn start(instances: usize) -> Self {
        assert!(instances > 0, "an HA registry needs at least one instance");
        crate::init();
        let s3 = S3Server::start();
        // One secret for all: an upload session opened through one instance is finished
        // through whichever instance the load balancer picks next.
        let http_secret = Secret::new(uuid::Uuid::new_v4().simple().to_string());
        let instances: Vec<Instance> = (0..instances)
            .map(|i| {
                let mut options = RegistryOptions {
                    storage: RegistryStorage::S3(s3.registry_storage(Some(ROOT_DIRECTORY))),
                    http_secret: Some(http_secret.clone()),
                    ..Default::default()
                };
                let registry = EmbeddedRegistry::start(options.clone())
                    .unwrap_or_else(|e| panic!("start registry instance {i} on S3: {e}"));
                options.port = Some(registry.port());
                Instance {
                    registry,
                    options,
                    earlier_requests: Vec::new(),
                }
            })
            .collect();
        let upstreams: Vec<String> = instances.iter().map(|i| i.registry.host()).collect();
        let load_balancer = LoadBalancer::start(&upstreams);
        Self {
            load_balancer,
            instances,
            s3,
        }
    }

    /// `127.0.0.1:<port>` of the load balancer: the registry host clients use (HTTPS).
    pub fn host(&self) -> String {
        self.load_balancer.host()
    }

    /// `https://127.0.0.1:<port>` of the load balancer.
    pub fn base_url(&self) -> String {
        self.load_balancer.base_url()
    }

    /// The CA certificate clients must trust to speak to the load balancer.
    pub fn ca_pem_path(&self) -> &std::path::Path {
        self.load_balancer.ca_pem_path()
    }

    /// The directory holding `ca.crt`, for skopeo's `--src-cert-dir`.
    pub fn cert_dir(&self) -> &std::path::Path {
        self.load_balancer.cert_dir()
    }

    /// How many registry instances there are.
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    /// `127.0.0.1:<port>` of instance `i`, spoken to directly over plain HTTP.
    pub fn instance_host(&self, i: usize) -> String {
        self.instance(i).registry.host()
    }

    /// Kills instance `i` with SIGKILL and waits until it is gone; the load balancer is not
    /// told.
    pub fn kill(&mut self, i: usize) {
        self.instance_mut(i).registry.kill();
    }

    /// Starts instance `i` again, on the same port with the same configuration (stopping it
    /// first if it still runs), and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        let instance = self.instance_mut(i);
        instance.registry.kill();
        instance
            .earlier_requests
            .extend(access_log::read(instance.registry.access_log_path()));
        let registry = EmbeddedRegistry::start(instance.options.clone())
            .unwrap_or_else(|e| panic!("restart registry instance {i}: {e}"));
        // The old handle goes only now: its drop deletes its work directory, nothing else.
        instance.registry = registry;
    }

    /// Whether instance `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.instance_mut(i).registry.is_running()
    }

    /// Every request each instance served, earlier incarnations included, indexed like the
    /// instances.
    pub fn access_logs(&self) -> Vec<Vec<AccessLogEntry>> {
        self.instances
            .iter()
            .map(|instance| {
                let mut requests = instance.earlier_requests.clone();
                requests.extend(access_log::read(instance.registry.access_log_path()));
                requests
            })
            .collect()
    }

    /// The load balancer, for its access log (which upstream answered each request).
    pub fn load_balancer(&self) -> &LoadBalancer {
        &self.load_balancer
    }

    /// The S3 server the instances share.
    pub fn s3(&self) -> &S3Server {
        &self.s3
    }

    /// Every blob's data object in the bucket, as `(digest, size)` sorted by digest, read from
    /// S3 itself: the keys `<root>/docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`.
    pub async fn blob_data_objects(&self) -> Vec<(String, u64)> {
        let prefix = format!("{ROOT_DIRECTORY}/docker/registry/v2/blobs/sha256");
        let mut blobs: Vec<(String, u64)> = self
            .s3
            .list_objects(&prefix)
            .await
            .into_iter()
            .filter_map(|(key, size)| {
                let relative = key.strip_prefix(&prefix)?.strip_prefix('/')?;
                let parts: Vec<&str> = relative.split('/').collect();
                match parts.as_slice() {
                    [shard, hex, "data"] if hex.starts_with(shard) => {
                        Some((format!("sha256:{hex}"), size))
                    }
                    _ => None,
                }
            })
            .collect();
        blobs.sort();
        blobs
    }

    fn instance(&self, i: usize) -> &Instance {
        self.instances
            .get(i)
            .unwrap_or_else(|| panic!("no instance {i} of {}", self.instances.len()))
    }

    fn instance_mut(&mut self, i: usize) -> &mut Instance {
        let count = self.instances.len();
        self.instances
            .get_mut(i)
            .unwrap_or_else(|| panic!("no instance {i} of {count}"))
    }
}
