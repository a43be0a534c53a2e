//! The embedded store of universal mode: applied resources, a revision that every
//! change bumps, and the control plane's secrets, in one redb file under the data
//! directory. Writes are transactions: a batch is validated against what is stored
//! and written whole, or refused whole; a restart loses nothing committed.

use std::{
    collections::BTreeMap,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ring::rand::SecureRandom;
use trellis_crds::{Document, Invalid, validate_batch};

const RESOURCES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("resources");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const SECRETS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("secrets");
/// The control plane's own bookkeeping that should survive a restart (the registry's
/// last endpoints), as opaque bytes by name.
const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");
/// Status of resources (a Canary's progress), by resource key: kept apart from the
/// resources so that an apply never overwrites what the control plane wrote, as with
/// a Kubernetes status subresource.
const STATUS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("status");
const REVISION: &str = "revision";
const FILE: &str = "trellis.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store: {0}")]
    Db(#[from] redb::Error),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Invalid>),
    #[error("stored resource {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("the system random source failed")]
    Random,
}

macro_rules! db {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Db(e.into()))
    };
}

/// Where a resource lives: kind, namespace (none for cluster-scoped kinds), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ResourceKey {
    pub fn of(document: &Document) -> Self {
        Self {
            kind: document.kind().to_string(),
            namespace: document.namespace().map(str::to_string),
            name: document.name().to_string(),
        }
    }

    fn encode(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind,
            self.namespace.as_deref().unwrap_or_default(),
            self.name
        )
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The store's revision after the batch (unchanged when nothing changed).
    pub revision: u64,
    pub changes: Vec<(ResourceKey, Change)>,
}

pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`: the folder 0700, the file 0600, since it
    /// holds the control plane's secrets.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            // Only a folder made here is narrowed; an operator's existing one is theirs.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let path = dir.join(FILE);
        // Created 0600 before redb touches it, and narrowed if it already existed
        // (a restored backup): it holds the join-token key.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
        let db = db!(Database::create(&path))?;
        let txn = db!(db.begin_write())?;
        db!(txn.open_table(RESOURCES))?;
        db!(txn.open_table(META))?;
        db!(txn.open_table(SECRETS))?;
        db!(txn.open_table(STATE))?;
        db!(txn.open_table(STATUS))?;
        db!(txn.commit())?;
        Ok(Self { db })
    }

    /// Validates `documents` against each other and the stored DestinationPolicies,
    /// then writes them all in one transaction, or nothing.
    pub fn apply(&self, documents: &[Document]) -> Result<Applied, StoreError> {
        let txn = db!(self.db.begin_write())?;
        let applied = {
            let mut resources = db!(txn.open_table(RESOURCES))?;
            // Validate the state the batch would leave, not the batch alone: a policy
            // update that drops a subset a stored route uses must be refused too.
            let mut after: BTreeMap<ResourceKey, Document> = decode_all(&resources)?
                .into_iter()
                .map(|d| (ResourceKey::of(&d), d))
                .collect();
            for document in documents {
                after.insert(ResourceKey::of(document), document.clone());
            }
            let after: Vec<Document> = after.into_values().collect();
            validate_batch(&after, &[]).map_err(StoreError::Invalid)?;
            let mut changes = Vec::with_capacity(documents.len());
            for document in documents {
                let key = ResourceKey::of(document);
                let document = &without_status(document);
                let json = document.to_json().map_err(|e| StoreError::Corrupt {
                    key: key.to_string(),
                    message: e.to_string(),
                })?;
                let encoded = key.encode();
                let change = match db!(resources.get(encoded.as_str()))? {
                    Some(old) if old.value() == json.as_slice() => Change::Unchanged,
                    Some(_) => Change::Updated,
                    None => Change::Created,
                };
                if change != Change::Unchanged {
                    db!(resources.insert(encoded.as_str(), json.as_slice()))?;
                }
                changes.push((key, change));
            }
            let mut meta = db!(txn.open_table(META))?;
            let mut revision = db!(meta.get(REVISION))?.map_or(0, |v| v.value());
            if changes.iter().any(|(_, c)| *c != Change::Unchanged) {
                revision += 1;
                db!(meta.insert(REVISION, revision))?;
            }
            Applied { revision, changes }
        };
        db!(txn.commit())?;
        Ok(applied)
    }

    pub fn get(&self, key: &ResourceKey) -> Result<Option<Document>, StoreError> {
        let txn = db!(self.db.begin_read())?;
        let resources = db!(txn.open_table(RESOURCES))?;
        let encoded = key.encode();
        match db!(resources.get(encoded.as_str()))? {
            Some(value) => decode(&encoded, value.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every stored resource, or those of one kind, in key order. One kind is read
    /// alone (keys start with it): the canary controller lists canaries often.
    pub fn list(&self, kind: Option<&str>) -> Result<Vec<Document>, StoreError> {
        let txn = db!(self.db.begin_read())?;
        let resources = db!(txn.open_table(RESOURCES))?;
        let Some(kind) = kind else {
            return decode_all(&resources);
        };
        let prefix = format!("{kind}/");
        let mut documents = Vec::new();
        for entry in db!(resources.range(prefix.as_str()..))? {
            let (key, value) = db!(entry)?;
            if !key.value().starts_with(prefix.as_str()) {
                break;
            }
            documents.push(decode(key.value(), value.value())?);
        }
        Ok(documents)
    }

    /// Removes a resource; `false` when there was none. Refused when what remains
    /// would be invalid (a DestinationPolicy whose subsets a route still uses).
    pub fn delete(&self, key: &ResourceKey) -> Result<bool, StoreError> {
        let txn = db!(self.db.begin_write())?;
        let removed = {
            let mut resources = db!(txn.open_table(RESOURCES))?;
            let remaining: Vec<Document> = decode_all(&resources)?
                .into_iter()
                .filter(|d| ResourceKey::of(d) != *key)
                .collect();
            validate_batch(&remaining, &[]).map_err(StoreError::Invalid)?;
            let removed = db!(resources.remove(key.encode().as_str()))?.is_some();
            db!(db!(txn.open_table(STATUS))?.remove(key.encode().as_str()))?;
            if removed {
                let mut meta = db!(txn.open_table(META))?;
                let revision = db!(meta.get(REVISION))?.map_or(0, |v| v.value());
                db!(meta.insert(REVISION, revision + 1))?;
            }
            removed
        };
        db!(txn.commit())?;
        Ok(removed)
    }

    pub fn revision(&self) -> Result<u64, StoreError> {
        let txn = db!(self.db.begin_read())?;
        let meta = db!(txn.open_table(META))?;
        Ok(db!(meta.get(REVISION))?.map_or(0, |v| v.value()))
    }

    /// The secret named `name`, created from `len` random bytes the first time.
    pub fn secret(&self, name: &str, len: usize) -> Result<Vec<u8>, StoreError> {
        let txn = db!(self.db.begin_write())?;
        let secret = {
            let mut secrets = db!(txn.open_table(SECRETS))?;
            let existing = db!(secrets.get(name))?.map(|v| v.value().to_vec());
            match existing {
                Some(secret) => secret,
                None => {
                    let mut secret = vec![0u8; len];
                    ring::rand::SystemRandom::new()
                        .fill(&mut secret)
                        .map_err(|_| StoreError::Random)?;
                    db!(secrets.insert(name, secret.as_slice()))?;
                    secret
                }
            }
        };
        db!(txn.commit())?;
        Ok(secret)
    }
}

impl Store {
    pub fn put_state(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = db!(self.db.begin_write())?;
        db!(db!(txn.open_table(STATE))?.insert(name, value))?;
        db!(txn.commit())?;
        Ok(())
    }

    pub fn state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = db!(self.db.begin_read())?;
        let table = db!(txn.open_table(STATE))?;
        Ok(db!(table.get(name))?.map(|v| v.value().to_vec()))
    }
}

impl Store {
    /// Writes the status of the resource at `key`, if it still exists; with
    /// `config_changed` (a canary's weight moved) the revision is bumped in the same
    /// transaction, so the compiler and anyone waiting on it see a new revision.
    /// Returns whether the resource existed.
    pub fn put_status(
        &self,
        key: &ResourceKey,
        status: &[u8],
        config_changed: bool,
    ) -> Result<bool, StoreError> {
        let encoded = key.encode();
        let txn = db!(self.db.begin_write())?;
        let exists = db!(db!(txn.open_table(RESOURCES))?.get(encoded.as_str()))?.is_some();
        if exists {
            db!(db!(txn.open_table(STATUS))?.insert(encoded.as_str(), status))?;
            if config_changed {
                let mut meta = db!(txn.open_table(META))?;
                let revision = db!(meta.get(REVISION))?.map_or(0, |v| v.value());
                db!(meta.insert(REVISION, revision + 1))?;
            }
        }
        db!(txn.commit())?;
        Ok(exists)
    }

    pub fn status(&self, key: &ResourceKey) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = db!(self.db.begin_read())?;
        let table = db!(txn.open_table(STATUS))?;
        Ok(db!(table.get(key.encode().as_str()))?.map(|v| v.value().to_vec()))
    }

    /// Every stored status of resources of `kind`, by (namespace, name).
    pub fn statuses(&self, kind: &str) -> Result<BTreeMap<(String, String), Vec<u8>>, StoreError> {
        let txn = db!(self.db.begin_read())?;
        let table = db!(txn.open_table(STATUS))?;
        let prefix = format!("{kind}/");
        let mut statuses = BTreeMap::new();
        for entry in db!(table.iter())? {
            let (key, value) = db!(entry)?;
            let Some(rest) = key.value().strip_prefix(prefix.as_str()) else {
                continue;
            };
            if let Some((namespace, name)) = rest.split_once('/') {
                statuses.insert(
                    (namespace.to_string(), name.to_string()),
                    value.value().to_vec(),
                );
            }
        }
        Ok(statuses)
    }
}

/// What an apply stores: a status pasted back from `get -o yaml` is not the spec's.
fn without_status(document: &Document) -> std::borrow::Cow<'_, Document> {
    match document {
        Document::Canary(canary) if canary.status.is_some() => {
            let mut canary = canary.clone();
            canary.status = None;
            std::borrow::Cow::Owned(Document::Canary(canary))
        }
        _ => std::borrow::Cow::Borrowed(document),
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Document, StoreError> {
    Document::from_json(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn decode_all(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<Document>, StoreError> {
    let mut documents = Vec::new();
    for entry in db!(table.iter())? {
        let (key, value) = db!(entry)?;
        documents.push(decode(key.value(), value.value())?);
    }
    Ok(documents)
}
