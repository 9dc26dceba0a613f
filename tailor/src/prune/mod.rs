//! The pruner: deletes from the internal registry the staged images nothing uses any more, and
//! never one that something does.
//!
//! A succeeded staging's image is *prunable* when
//! - it was released (`DELETE /stage/{guid}`, `DELETE /apps/{guid}`) or a reference sync left it
//!   out, more than `grace` ago, and
//! - it is not the newest successful staging of an app that still exists.
//!
//! The registry deletes manifests by digest, and with one every tag in the repository that
//! points at it; so a manifest is deleted only when every staging pinned to it (same
//! repository, same digest) is prunable. Pruning and staging are kept apart by [`locks`]; two
//! runs never overlap. Each deletion is written to `prune_audit` with its reason.
//!
//! Blob storage is reclaimed later by the registry's own garbage collector, run in a
//! maintenance window (`scripts/registry-gc`). `bytes_reclaimable` is what it will free as far
//! as the blob index knows: the objects (manifests, configs, layers) that only pruned images use.

pub mod duration;
pub mod locks;
pub mod schedule;
mod store;

use store::{Candidate, pinned_digest};
pub use store::{PruneMetrics, metrics};

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::code::Code;
use crate::registry::{Deleted, Registry};

/// How a run behaves.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// How long an image stays after it stopped being used.
    pub grace: Duration,
    /// Decide and report, change nothing.
    pub dry_run: bool,
}

/// Points in a run where a test can step in. Production runs have none ([`prune`]); tests of
/// races use them to hold a run at the exact moment a race needs (see
/// `stager-api/tests/api/prune.rs`), so a test can prove it hit the window it is about.
#[derive(Clone, Default)]
pub struct PruneHooks {
    /// Awaited after a repository's decisions are committed and before its first deletion,
    /// with the repository's name, while the run holds that repository's lease.
    pub before_delete:
        Option<Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>>,
}

impl std::fmt::Debug for PruneHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PruneHooks")
            .field("before_delete", &self.before_delete.is_some())
            .finish()
    }
}

/// Why an image is no longer needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Reason {
    Released,
    Unreferenced,
    AppDeleted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::Unreferenced => "unreferenced",
            Self::AppDeleted => "app_deleted",
        }
    }
}

/// What the run did with a prunable image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The manifest was deleted.
    Deleted,
    /// The registry no longer had the manifest; the staging is recorded as pruned.
    AlreadyGone,
    /// Dry run: would be deleted.
    WouldDelete,
    /// Another staging still in use is pinned to the same manifest: kept.
    KeptShared,
    /// A staging is copying into the repository right now: left for the next run.
    SkippedBusy,
    /// Deleting failed; see `detail`.
    Failed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::AlreadyGone => "already gone",
            Self::WouldDelete => "would delete",
            Self::KeptShared => "kept (shared)",
            Self::SkippedBusy => "skipped (staging)",
            Self::Failed => "failed",
        }
    }

    /// The image is (or, in a dry run, would be) gone from the registry.
    pub fn prunes(self) -> bool {
        matches!(self, Self::Deleted | Self::AlreadyGone | Self::WouldDelete)
    }
}

/// One prunable image and what became of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub app_guid: Uuid,
    pub staging_guid: Uuid,
    pub repository: String,
    pub digest: String,
    pub reason: Reason,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How a run ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneOutcome {
    NothingToDo,
    Pruned,
    Error,
}

impl PruneOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NothingToDo => "nothing_to_do",
            Self::Pruned => "pruned",
            Self::Error => "error",
        }
    }
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub outcome: PruneOutcome,
    pub grace_seconds: u64,
    /// The `prune_runs` row (none for a dry run, which writes nothing).
    pub run_id: Option<i64>,
    /// Stagings whose image is (would be) gone.
    pub images_pruned: usize,
    /// Manifest deletions sent to the registry.
    pub manifests_deleted: usize,
    /// What the registry's garbage collection will free afterwards, per the blob index.
    pub bytes_reclaimable: u64,
    pub decisions: Vec<Decision>,
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("another prune run holds the prune lock; try again when it has finished")]
    AlreadyRunning,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl PruneError {
    pub fn code(&self) -> Code {
        match self {
            Self::AlreadyRunning => Code::PruneAlreadyRunning,
            Self::Database(error) => crate::db::error_code(error),
        }
    }
}

/// What becomes of one manifest revision's prunable stagings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A live staging is pinned to the same revision: deleting it would break that one.
    Keep,
    /// Every staging pinned to the revision may go: the manifest is deleted.
    Delete,
}

/// The one rule the dry run and the real run both apply, so they can never disagree: the
/// candidates grouped by manifest revision (the registry deletes by digest, and with it every
/// tag pointing there), each group deleted only when no live staging (`shared`) is pinned to
/// its revision. Groups come in the order of their revisions.
fn judge(candidates: Vec<Candidate>, shared: &HashSet<String>) -> Vec<(Verdict, Vec<Candidate>)> {
    let mut by_manifest: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    for candidate in candidates {
        by_manifest
            .entry(candidate.manifest.clone())
            .or_default()
            .push(candidate);
    }
    by_manifest
        .into_iter()
        .map(|(manifest, group)| {
            let verdict = if shared.contains(&manifest) {
                Verdict::Keep
            } else {
                Verdict::Delete
            };
            (verdict, group)
        })
        .collect()
}

/// Runs the pruner once against the internal registry `internal`.
pub async fn prune(
    pool: &PgPool,
    internal: &Arc<Registry>,
    options: &PruneOptions,
) -> Result<PruneReport, PruneError> {
    prune_with_hooks(pool, internal, options, &PruneHooks::default()).await
}

/// [`prune`], stepping into `hooks` on the way (tests of races).
pub async fn prune_with_hooks(
    pool: &PgPool,
    internal: &Arc<Registry>,
    options: &PruneOptions,
    hooks: &PruneHooks,
) -> Result<PruneReport, PruneError> {
    let leases = locks::PruneLeases::try_start(pool)
        .await?
        .ok_or(PruneError::AlreadyRunning)?;
    let result = run_locked(pool, internal, &leases, options, hooks).await;
    leases.finish().await;
    result
}

async fn run_locked(
    pool: &PgPool,
    internal: &Arc<Registry>,
    leases: &locks::PruneLeases,
    options: &PruneOptions,
    hooks: &PruneHooks,
) -> Result<PruneReport, PruneError> {
    let run_id: Option<i64> = if options.dry_run {
        None
    } else {
        Some(store::start_run(pool, options.grace).await?)
    };
    let mut run = Run {
        pool,
        internal,
        leases,
        options,
        hooks,
        run_id,
        decisions: Vec::new(),
        errors: Vec::new(),
        manifests_deleted: 0,
    };
    let result = run.prune_all().await;
    if let Err(error) = &result {
        run.errors.push(error.to_string());
    }
    let pruned: Vec<Uuid> = run
        .decisions
        .iter()
        .filter(|d| d.action.prunes())
        .map(|d| d.staging_guid)
        .collect();
    let bytes_reclaimable = match store::reclaimable_bytes(pool, &pruned).await {
        Ok(bytes) => bytes,
        Err(error) => {
            run.errors
                .push(format!("reclaimable bytes unknown: {error}"));
            0
        }
    };
    let outcome = if !run.errors.is_empty() {
        PruneOutcome::Error
    } else if pruned.is_empty() {
        PruneOutcome::NothingToDo
    } else {
        PruneOutcome::Pruned
    };
    let report = PruneReport {
        dry_run: options.dry_run,
        outcome,
        grace_seconds: options.grace.as_secs(),
        run_id,
        images_pruned: pruned.len(),
        manifests_deleted: run.manifests_deleted,
        bytes_reclaimable,
        decisions: run.decisions,
        errors: run.errors,
    };
    if let Some(id) = run_id {
        let finished = store::finish_run(pool, id, &report).await;
        // The report says what happened in the registry; losing the run's summary row must
        // not lose that.
        if let Err(error) = finished {
            tracing::warn!(%error, run_id = id, "could not record the prune run's outcome");
        }
    }
    result.map(|()| report)
}

/// One run's state.
struct Run<'a> {
    pool: &'a PgPool,
    internal: &'a Arc<Registry>,
    leases: &'a locks::PruneLeases,
    options: &'a PruneOptions,
    hooks: &'a PruneHooks,
    run_id: Option<i64>,
    decisions: Vec<Decision>,
    errors: Vec<String>,
    manifests_deleted: usize,
}

impl Run<'_> {
    async fn prune_all(&mut self) -> Result<(), PruneError> {
        let all = store::candidates(self.pool, self.options.grace, None).await?;
        let mut by_repository: BTreeMap<(Uuid, String), Vec<Candidate>> = BTreeMap::new();
        for candidate in all {
            match self.repository_of(&candidate) {
                Ok(repository) => by_repository
                    .entry((candidate.app_guid, repository))
                    .or_default()
                    .push(candidate),
                Err(problem) => {
                    self.errors.push(problem.clone());
                    self.decide(&candidate, "", Action::Failed, Some(problem));
                }
            }
        }
        if self.options.dry_run {
            return self.plan(by_repository).await;
        }
        for (app_guid, repository) in by_repository.into_keys() {
            if let Err(error) = self.prune_repository(app_guid, &repository).await {
                self.errors.push(format!("{repository}: {error}"));
            }
        }
        match store::forget_stale_checkpoints(self.pool).await {
            Ok(0) => {}
            Ok(forgotten) => {
                tracing::info!(
                    forgotten,
                    "forgot upload checkpoints older than the registry keeps uploads"
                );
            }
            // Housekeeping: the next run tries again; this run's deletions stand.
            Err(error) => tracing::warn!(%error, "could not forget stale upload checkpoints"),
        }
        Ok(())
    }

    /// The repository of a candidate's pinned image, which must be in the internal registry.
    fn repository_of(&self, candidate: &Candidate) -> Result<String, String> {
        let reference = &candidate.pinned_image;
        if reference.registry != self.internal.name() {
            return Err(format!(
                "staging {} is pinned to {}, outside the internal registry {}; not pruning it",
                candidate.staging_guid,
                candidate.pinned_image,
                self.internal.name()
            ));
        }
        Ok(reference.repository.clone())
    }

    fn decide(
        &mut self,
        candidate: &Candidate,
        repository: &str,
        action: Action,
        detail: Option<String>,
    ) {
        self.decisions.push(Decision {
            app_guid: candidate.app_guid,
            staging_guid: candidate.staging_guid,
            repository: repository.to_owned(),
            digest: pinned_digest(&candidate.pinned_image).to_owned(),
            reason: candidate.reason,
            action,
            detail,
        });
    }

    /// Dry run: what `prune_repository` would do, without locks or changes.
    async fn plan(
        &mut self,
        by_repository: BTreeMap<(Uuid, String), Vec<Candidate>>,
    ) -> Result<(), PruneError> {
        let all: Vec<Candidate> = by_repository.values().flatten().cloned().collect();
        let shared = store::shared_with_live(self.pool, &all).await?;
        for ((_, repository), group) in by_repository {
            for (verdict, stagings) in judge(group, &shared) {
                let action = match verdict {
                    Verdict::Keep => Action::KeptShared,
                    Verdict::Delete => Action::WouldDelete,
                };
                for candidate in &stagings {
                    self.decide(candidate, &repository, action, None);
                }
            }
        }
        Ok(())
    }

    /// Holding the repository against stagings (its lease, exclusively), re-reads its prunable
    /// stagings and decides in one short transaction (recording each decided deletion as done,
    /// with an audit row saying `deleting`); then deletes the manifests, with no transaction
    /// open; then records each outcome, undoing the decision where a deletion failed.
    async fn prune_repository(&mut self, app: Uuid, repository: &str) -> Result<(), PruneError> {
        let in_repository =
            |this: &Self, c: &Candidate| this.repository_of(c).is_ok_and(|r| r == repository);
        if !self.leases.try_repository(repository).await? {
            for candidate in store::candidates(self.pool, self.options.grace, Some(app)).await? {
                if in_repository(self, &candidate) {
                    self.decide(&candidate, repository, Action::SkippedBusy, None);
                }
            }
            return Ok(());
        }
        let result = self.prune_held_repository(app, repository).await;
        self.leases.let_go_of_repository(repository).await;
        result
    }

    async fn prune_held_repository(
        &mut self,
        app: Uuid,
        repository: &str,
    ) -> Result<(), PruneError> {
        let in_repository =
            |this: &Self, c: &Candidate| this.repository_of(c).is_ok_and(|r| r == repository);
        let mut tx = self.pool.begin().await?;
        // Until this commits, a new staging of the app (which would make it exist again) and
        // a reference sync (which could reference a candidate again) wait; after it, the
        // candidates are pruned as far as the reference record is concerned.
        store::hold_app(&mut tx, app).await?;
        let group: Vec<Candidate> = store::candidates(&mut *tx, self.options.grace, Some(app))
            .await?
            .into_iter()
            .filter(|c| in_repository(self, c))
            .collect();
        let shared = store::shared_with_live(&mut *tx, &group).await?;
        let mut to_delete: Vec<(Vec<Candidate>, Vec<i64>)> = Vec::new();
        for (verdict, stagings) in judge(group, &shared) {
            if verdict == Verdict::Keep {
                for candidate in &stagings {
                    self.decide(candidate, repository, Action::KeptShared, None);
                }
                continue;
            }
            let refs: Vec<&Candidate> = stagings.iter().collect();
            let intents = store::audit_intent(&mut tx, self.run_id, repository, &refs).await?;
            store::mark_pruned(&mut tx, &refs).await?;
            to_delete.push((stagings, intents));
        }
        tx.commit().await?;
        if let Some(hook) = &self.hooks.before_delete
            && !to_delete.is_empty()
        {
            hook(repository.to_owned()).await;
        }

        let repo = self.internal.repository(repository);
        for (stagings, intents) in to_delete {
            let refs: Vec<&Candidate> = stagings.iter().collect();
            let digest = pinned_digest(&stagings[0].pinned_image).to_owned();
            // The lease is renewed by the run; a lapse (the database unreachable for a minute)
            // means a staging may have started here: leave the manifest for the next run.
            let still_held = self
                .leases
                .holds_repository(repository)
                .await
                .unwrap_or(false);
            let deleted = if still_held {
                let deleted = repo
                    .delete_manifest(&digest)
                    .await
                    .map_err(|e| format!("{}: {e}", e.code()));
                // Its signatures, SBOMs and attestations go with it (after it: while it is
                // kept, so are they). A failure here leaves only artifacts about an image
                // that is gone, and the run reports it.
                if deleted.is_ok() {
                    let app = stagings[0].app_guid;
                    let removed = match crate::staging::store::objects_in_use(self.pool, app).await
                    {
                        Ok(keep) => crate::registry::referrers::remove(&repo, &digest, &keep)
                            .await
                            .map_err(|e| format!("{}: {e}", e.code())),
                        Err(error) => Err(error.to_string()),
                    };
                    if let Err(error) = removed {
                        self.errors
                            .push(format!("{repository}@{digest}: its referrers: {error}"));
                    }
                }
                deleted
            } else {
                Err("the repository lease lapsed before the deletion".to_owned())
            };
            let mut tx = self.pool.begin().await?;
            match deleted {
                Ok(outcome) => {
                    let action = match outcome {
                        Deleted::Deleted => Action::Deleted,
                        Deleted::AlreadyGone => Action::AlreadyGone,
                    };
                    if action == Action::Deleted {
                        self.manifests_deleted += 1;
                    }
                    store::record(&mut tx, &intents, action).await?;
                    for candidate in &stagings {
                        self.decide(candidate, repository, action, None);
                    }
                }
                Err(detail) => {
                    self.errors.push(format!("{repository}@{digest}: {detail}"));
                    store::unmark_pruned(&mut tx, &refs, &intents).await?;
                    for candidate in &stagings {
                        self.decide(candidate, repository, Action::Failed, Some(detail.clone()));
                    }
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ImageReference;

    fn candidate(manifest: &str) -> Candidate {
        Candidate {
            staging_guid: Uuid::new_v4(),
            app_guid: Uuid::nil(),
            pinned_image: ImageReference::parse(&format!("registry.internal/{manifest}")).unwrap(),
            manifest: manifest.to_owned(),
            reason: Reason::Released,
        }
    }

    fn guids(group: &[Candidate]) -> Vec<Uuid> {
        group.iter().map(|c| c.staging_guid).collect()
    }

    #[test]
    fn a_revision_goes_only_with_every_staging_pinned_to_it_and_nothing_live_on_it() {
        let a1 = candidate(
            "tailor/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        );
        let a2 = candidate(
            "tailor/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        );
        let b = candidate(
            "tailor/app@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        );
        let c = candidate(
            "tailor/app@sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
        );
        let shared: HashSet<String> = [
            "tailor/app@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
                .to_owned(),
        ]
        .into();

        let judged = judge(vec![c.clone(), a1.clone(), b.clone(), a2.clone()], &shared);

        let summary: Vec<(Verdict, Vec<Uuid>)> = judged
            .iter()
            .map(|(verdict, group)| (*verdict, guids(group)))
            .collect();
        assert_eq!(
            summary,
            vec![
                // Two stagings on one revision: one deletion, decided for both.
                (Verdict::Delete, vec![a1.staging_guid, a2.staging_guid]),
                // A live staging shares it: kept.
                (Verdict::Keep, vec![b.staging_guid]),
                (Verdict::Delete, vec![c.staging_guid]),
            ]
        );
    }

    #[test]
    fn nothing_to_judge_is_nothing_judged() {
        assert!(judge(Vec::new(), &HashSet::new()).is_empty());
    }
}
