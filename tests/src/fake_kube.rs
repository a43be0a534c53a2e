//! A fake Kubernetes API server for tests: plain HTTP on 127.0.0.1:0, generic over every
//! group/version/resource, so `kube::Client` (and thus `Api`, `watcher`, `reflector`)
//! talks to it as to a real one. No real API server can run on the test machines.
//!
//! What it serves, for core paths (`/api/v1/...`) and group paths
//! (`/apis/<group>/<version>/...`), namespaced (`.../namespaces/<ns>/<resource>`) and
//! cluster-wide (`.../<resource>`, which for a namespaced resource lists every namespace):
//!
//! - list: `GET <collection>` → `{kind: <Kind>List, metadata: {resourceVersion}, items}`;
//!   `labelSelector` (`a=b`, `a==b`, `a!=b`, `a`, `!a`) and `fieldSelector`
//!   (`metadata.name=`, `metadata.namespace=`) are honoured; `limit`/`continue` are
//!   ignored (everything fits in one page).
//! - watch: `GET <collection>?watch=1&resourceVersion=X[&allowWatchBookmarks=true]
//!   [&timeoutSeconds=N]` → chunked JSON lines `{type, object}` with `type` one of
//!   ADDED, MODIFIED, DELETED, BOOKMARK, ERROR. Events after X are replayed from the
//!   history, then live ones follow. A resourceVersion older than the history
//!   ([`FakeKube::compact`]) gets an ERROR event with a 410 `Expired` Status, as a real
//!   server does. With bookmarks allowed, a BOOKMARK with the current version is sent
//!   first and on [`FakeKube::bookmark`]. Without `resourceVersion` (or `0`), the
//!   current objects come first as ADDED.
//! - get, create (POST), replace (PUT; a stale `metadata.resourceVersion` is a 409, as
//!   it is in any patch),
//!   patch (merge `application/merge-patch+json`; strategic merge treated as merge;
//!   server-side apply `application/apply-patch+yaml` as a merge that creates the object
//!   when absent; JSON patch `application/json-patch+json` with add/replace/remove/test),
//!   delete (returns the deleted object).
//! - `/status` subresources: GET/PUT/PATCH change only `status`; main-resource updates
//!   keep the stored `status` (as for resources with a status subresource). A create
//!   keeps the `status` it is given, so a test can create a Pod with its `podIP`.
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` (and any POST-only virtual
//!   resource) through a pluggable handler: [`FakeKube::on_create`].
//! - `GET /version`.
//!
//! Every write stamps a resourceVersion from one global, monotonically increasing
//! counter (as etcd's revision), `uid`, `creationTimestamp` and `generation` (bumped
//! when `spec` changes).
//!
//! Faults and back doors for tests: [`FakeKube::fail_next`] (the next N requests get a
//! 500), [`FakeKube::break_watches`] (every open watch gets an ERROR and is closed),
//! [`FakeKube::compact`] (forget history: resuming watches get 410 Gone),
//! [`FakeKube::put_raw`] (store any JSON as is, e.g. a malformed object), and
//! [`FakeKube::apply`]/[`FakeKube::remove`]/[`FakeKube::get`] by apiVersion + kind.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

type Body = BoxBody<Bytes, Infallible>;

/// Handles a POST to a virtual resource (e.g. a TokenReview): the request body in, the
/// response object out, or an HTTP status and message.
pub type CreateHandler = Arc<dyn Fn(Value) -> Result<Value, (u16, String)> + Send + Sync>;

/// `<group>/<version>/<resource>`; the group is empty for core.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Collection {
    group: String,
    version: String,
    resource: String,
}

impl Collection {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// An object's place: its collection, namespace ("" when cluster-scoped) and name.
type Key = (Collection, String, String);

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    collection: Collection,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Clone)]
enum WatchMsg {
    Event(Arc<Event>),
    /// Every open watch sends this line, then ends.
    Break(Bytes),
    Bookmark,
}

struct State {
    objects: Mutex<Store>,
    events: broadcast::Sender<WatchMsg>,
    fail_next: AtomicUsize,
    watches_started: AtomicUsize,
    requests: AtomicU64,
    handlers: Mutex<HashMap<(String, String), CreateHandler>>,
    /// Kinds seen per collection, for list kinds and `apply` by kind.
    kinds: Mutex<HashMap<Collection, String>>,
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Event>>,
    /// The oldest resourceVersion a watch may resume from.
    compacted: u64,
    revision: u64,
}

/// The running fake; stops (closing every watch) when dropped.
pub struct FakeKube {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let _ = self.state.shutdown.send(true);
    }
}

impl FakeKube {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(4096);
        let (shutdown, mut stopped) = watch::channel(false);
        let state = Arc::new(State {
            objects: Mutex::default(),
            events,
            fail_next: AtomicUsize::new(0),
            watches_started: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            handlers: Mutex::default(),
            kinds: Mutex::default(),
            shutdown,
        });
        let serving = state.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Self { addr, state }
    }

    /// `http://127.0.0.1:PORT`, for `--kube-api-server` or `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next `n` requests (any path, watches included) get a 500 InternalError.
    pub fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every open watch gets an ERROR event (500 InternalError) and its stream ends.
    pub fn break_watches(&self) {
        let status = status_object(500, "InternalError", "watch broken by the test");
        let line = watch_line("ERROR", &status);
        let _ = self.state.events.send(WatchMsg::Break(line));
    }

    /// Forgets the event history: a watch resuming from any version before now gets
    /// 410 Gone and must list again.
    pub fn compact(&self) {
        let mut store = self.state.objects.lock();
        store.history.clear();
        store.compacted = store.revision;
    }

    /// Sends a BOOKMARK with the current version to every watch that allows them.
    pub fn bookmark(&self) {
        let _ = self.state.events.send(WatchMsg::Bookmark);
    }

    /// How many watch requests were started so far (a recovering watcher adds one).
    pub fn watches_started(&self) -> usize {
        self.state.watches_started.load(Ordering::SeqCst)
    }

    /// How many requests were served so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.objects.lock().revision
    }

    /// Serves POSTs to `<group>/<resource>` (group "" for core) with `handler` instead
    /// of storing them, e.g. `on_create("authentication.k8s.io", "tokenreviews", ...)`.
    pub fn on_create(
        &self,
        group: &str,
        resource: &str,
        handler: impl Fn(Value) -> Result<Value, (u16, String)> + Send + Sync + 'static,
    ) {
        self.state
            .handlers
            .lock()
            .insert((group.into(), resource.into()), Arc::new(handler));
    }

    /// Creates or replaces `object` (with `apiVersion`, `kind`, `metadata.name` and, if
    /// namespaced, `metadata.namespace`) as a client's PUT would, status included.
    /// Returns the stored object.
    pub fn apply(&self, object: Value) -> Value {
        let (collection, namespace, name) = key_of(&object);
        self.state
            .write(&collection, &namespace, &name, object, false)
            .unwrap()
    }

    /// Stores `object` exactly as given (no schema, only `resourceVersion` is stamped)
    /// under `api_version`/`kind`, e.g. a malformed object a real server's schema might
    /// have let through.
    pub fn put_raw(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Value {
        let collection = collection_of(api_version, kind);
        self.state.remember_kind(&collection, kind);
        self.state
            .write(&collection, namespace, name, object, true)
            .unwrap()
    }

    /// Deletes an object; returns it, or `None` if there was none.
    pub fn remove(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let collection = collection_of(api_version, kind);
        self.state.delete(&collection, namespace, name)
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            collection_of(api_version, kind),
            namespace.to_string(),
            name.to_string(),
        );
        self.state.objects.lock().objects.get(&key).cloned()
    }

    /// Every object of a kind, in every namespace.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let collection = collection_of(api_version, kind);
        let store = self.state.objects.lock();
        store
            .objects
            .iter()
            .filter(|((c, _, _), _)| *c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// The plural resource name of a kind, as the API server's REST mapping has it for
/// every kind Trellis uses (and most others).
pub fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower == "endpoints" {
        return lower;
    }
    if let Some(stem) = lower.strip_suffix('y')
        && !stem.ends_with(['a', 'e', 'i', 'o', 'u'])
    {
        return format!("{stem}ies");
    }
    if lower.ends_with('s') {
        return format!("{lower}es");
    }
    format!("{lower}s")
}

fn collection_of(api_version: &str, kind: &str) -> Collection {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Collection {
        group: group.into(),
        version: version.into(),
        resource: plural(kind),
    }
}

fn key_of(object: &Value) -> Key {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or("");
    (
        collection_of(api_version, kind),
        namespace.into(),
        name.into(),
    )
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn error(code: u16, reason: &str, message: impl Into<String>) -> Response<Body> {
    json_response(code, &status_object(code, reason, &message.into()))
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let Value::Object(target) = target else {
                return;
            };
            for (k, v) in fields {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge(target.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// RFC 6902 JSON patch: add, replace, remove and test.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("op without a path")?;
        let kind = op["op"].as_str().ok_or("op without an op")?;
        let (parent_path, last) = path.rsplit_once('/').ok_or("path must start with /")?;
        let last = last.replace("~1", "/").replace("~0", "~");
        match kind {
            "test" => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            "add" | "replace" | "remove" => {
                let parent = target
                    .pointer_mut(parent_path)
                    .ok_or_else(|| format!("no parent for {path}"))?;
                match parent {
                    Value::Object(map) => {
                        if kind == "remove" {
                            map.remove(&last)
                                .ok_or_else(|| format!("nothing at {path}"))?;
                        } else {
                            if kind == "replace" && !map.contains_key(&last) {
                                return Err(format!("nothing to replace at {path}"));
                            }
                            map.insert(last, op["value"].clone());
                        }
                    }
                    Value::Array(items) => {
                        let index = if last == "-" {
                            items.len()
                        } else {
                            last.parse::<usize>()
                                .map_err(|_| format!("bad index in {path}"))?
                        };
                        match kind {
                            "add" if index <= items.len() => {
                                items.insert(index, op["value"].clone())
                            }
                            "replace" if index < items.len() => items[index] = op["value"].clone(),
                            "remove" if index < items.len() => {
                                items.remove(index);
                            }
                            _ => return Err(format!("index out of range in {path}")),
                        }
                    }
                    _ => return Err(format!("{parent_path} is not a container")),
                }
            }
            other => return Err(format!("unsupported op {other}")),
        }
    }
    Ok(())
}

fn matches_labels(object: &Value, selector: &str) -> bool {
    let labels = &object["metadata"]["labels"];
    selector
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .all(|term| {
            let term = term.trim();
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels[k.trim()].as_str() == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels.get(k.trim()).is_none()
            } else {
                labels.get(term).is_some()
            }
        })
}

fn matches_fields(object: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .all(|term| {
            let (path, want, equal) = match term.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((k, v)) => (k, v, true),
                    None => return true,
                },
            };
            let pointer = format!("/{}", path.trim().replace('.', "/"));
            let have = object
                .pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (have == want.trim()) == equal
        })
}

#[derive(Default)]
struct Query {
    params: HashMap<String, String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let params = query
            .unwrap_or("")
            .split('&')
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (!k.is_empty()).then(|| (decode(k), decode(v)))
            })
            .collect();
        Self { params }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true"))
    }

    fn selects(&self, object: &Value) -> bool {
        self.get("labelSelector")
            .is_none_or(|s| matches_labels(object, s))
            && self
                .get("fieldSelector")
                .is_none_or(|s| matches_fields(object, s))
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request path taken apart.
struct Target {
    collection: Collection,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        // `namespaces/<ns>/<resource>...`, but `namespaces/<name>[/status]` is a Namespace.
        ["namespaces", ns, resource, tail @ ..]
            if *resource != "status" && *resource != "finalize" =>
        {
            (Some(ns.to_string()), [&[*resource][..], tail].concat())
        }
        rest => (None, rest.to_vec()),
    };
    let (resource, name, subresource) = match rest.as_slice() {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Target {
        collection: Collection {
            group: group.into(),
            version: version.into(),
            resource: resource.into(),
        },
        namespace,
        name,
        subresource,
    })
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl State {
    fn remember_kind(&self, collection: &Collection, kind: &str) {
        self.kinds
            .lock()
            .entry(collection.clone())
            .or_insert_with(|| kind.to_string());
    }

    fn kind_of(&self, collection: &Collection) -> String {
        if let Some(kind) = self.kinds.lock().get(collection) {
            return kind.clone();
        }
        let mut chars = collection.resource.trim_end_matches('s').chars();
        chars
            .next()
            .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
            .unwrap_or_default()
    }

    /// Stores `object` under the key, stamping metadata (all of it unless `raw`), and
    /// tells the watches. Returns the stored object.
    fn write(
        &self,
        collection: &Collection,
        namespace: &str,
        name: &str,
        mut object: Value,
        raw: bool,
    ) -> Result<Value, String> {
        let key = (collection.clone(), namespace.to_string(), name.to_string());
        if !object.is_object() {
            return Err("the body is not a JSON object".into());
        }
        let mut store = self.objects.lock();
        let old = store.objects.get(&key).cloned();
        store.revision += 1;
        let rv = store.revision;
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if !raw {
            meta["name"] = json!(name);
            if !namespace.is_empty() {
                meta["namespace"] = json!(namespace);
            }
            let old_meta = old.as_ref().map(|o| &o["metadata"]);
            meta["uid"] = old_meta
                .and_then(|m| m.get("uid").cloned())
                .unwrap_or_else(|| json!(format!("uid-{}-{rv}", name)));
            meta["creationTimestamp"] = old_meta
                .and_then(|m| m.get("creationTimestamp").cloned())
                .unwrap_or_else(|| json!(now()));
            let generation = match &old {
                Some(old) => {
                    let previous = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    if old.get("spec") == object.get("spec") {
                        previous
                    } else {
                        previous + 1
                    }
                }
                None => 1,
            };
            object["metadata"]["generation"] = json!(generation);
            if let Some(kind) = object["kind"].as_str() {
                self.remember_kind(collection, kind);
            }
        }
        store.objects.insert(key, object.clone());
        let event = Arc::new(Event {
            rv,
            collection: collection.clone(),
            namespace: namespace.to_string(),
            kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
            object: object.clone(),
        });
        store.history.push(event.clone());
        // Sent under the lock: a watch that starts replays history under the same lock,
        // so no event is both replayed and received, or neither.
        let _ = self.events.send(WatchMsg::Event(event));
        Ok(object)
    }

    fn delete(&self, collection: &Collection, namespace: &str, name: &str) -> Option<Value> {
        let key = (collection.clone(), namespace.to_string(), name.to_string());
        let mut store = self.objects.lock();
        let mut object = store.objects.remove(&key)?;
        store.revision += 1;
        let rv = store.revision;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = Arc::new(Event {
            rv,
            collection: collection.clone(),
            namespace: namespace.to_string(),
            kind: "DELETED",
            object: object.clone(),
        });
        store.history.push(event.clone());
        let _ = self.events.send(WatchMsg::Event(event));
        Some(object)
    }
}

async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return error(500, "InternalError", "injected failure");
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(400, "BadRequest", format!("reading the body: {e}")),
    };
    let path = parts.uri.path();
    if path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
        );
    }
    let query = Query::parse(parts.uri.query());
    let Some(target) = parse_path(path) else {
        return error(404, "NotFound", format!("the fake API serves no {path}"));
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let namespace = target.namespace.clone().unwrap_or_default();
    match (&parts.method, &target.name) {
        (&Method::GET, None) if query.flag("watch") => watch(state, &target, &query),
        (&Method::GET, None) => list(state, &target, &query),
        (&Method::GET, Some(name)) => {
            let key = (target.collection.clone(), namespace, name.clone());
            match state.objects.lock().objects.get(&key) {
                Some(object) => json_response(200, object),
                None => not_found(&target.collection, name),
            }
        }
        (&Method::POST, None) => {
            let object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(400, "BadRequest", format!("the body is not JSON: {e}")),
            };
            let handler = state
                .handlers
                .lock()
                .get(&(
                    target.collection.group.clone(),
                    target.collection.resource.clone(),
                ))
                .cloned();
            if let Some(handler) = handler {
                return match handler(object) {
                    Ok(v) => json_response(201, &v),
                    Err((code, message)) => error(code, "Failure", message),
                };
            }
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return error(422, "Invalid", "metadata.name: Required value");
            };
            let key = (target.collection.clone(), namespace.clone(), name.clone());
            if state.objects.lock().objects.contains_key(&key) {
                return error(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", target.collection.resource),
                );
            }
            match state.write(&target.collection, &namespace, &name, object, false) {
                Ok(v) => json_response(201, &v),
                Err(e) => error(400, "BadRequest", e),
            }
        }
        (&Method::PUT, Some(name)) => {
            let object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(400, "BadRequest", format!("the body is not JSON: {e}")),
            };
            let key = (target.collection.clone(), namespace.clone(), name.clone());
            let Some(old) = state.objects.lock().objects.get(&key).cloned() else {
                return not_found(&target.collection, name);
            };
            if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
                && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            {
                return conflict(&target.collection, name);
            }
            let updated = only_status_or_not(old, object, target.subresource.is_some());
            match state.write(&target.collection, &namespace, name, updated, false) {
                Ok(v) => json_response(200, &v),
                Err(e) => error(400, "BadRequest", e),
            }
        }
        (&Method::PATCH, Some(name)) => {
            let key = (target.collection.clone(), namespace.clone(), name.clone());
            let old = state.objects.lock().objects.get(&key).cloned();
            let apply = content_type.starts_with("application/apply-patch");
            let patch: Value = if apply {
                match serde_yaml_ng::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => {
                        return error(400, "BadRequest", format!("the body is not YAML: {e}"));
                    }
                }
            } else {
                match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => {
                        return error(400, "BadRequest", format!("the body is not JSON: {e}"));
                    }
                }
            };
            // As the API server does: a resourceVersion in a patch is a precondition.
            if let (Some(rv), Some(old)) = (patch["metadata"]["resourceVersion"].as_str(), &old)
                && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            {
                return conflict(&target.collection, name);
            }
            let (mut patched, existed) = match old.clone() {
                Some(o) => (o, true),
                None if apply => (json!({}), false),
                None => return not_found(&target.collection, name),
            };
            if content_type.starts_with("application/json-patch") {
                if let Err(e) = json_patch(&mut patched, &patch) {
                    return error(422, "Invalid", e);
                }
            } else {
                merge(&mut patched, &patch);
            }
            let updated = match old {
                Some(old) => only_status_or_not(old, patched, target.subresource.is_some()),
                None => patched,
            };
            match state.write(&target.collection, &namespace, name, updated, false) {
                Ok(v) => json_response(if existed { 200 } else { 201 }, &v),
                Err(e) => error(400, "BadRequest", e),
            }
        }
        (&Method::DELETE, Some(name)) => match state.delete(&target.collection, &namespace, name) {
            Some(object) => json_response(200, &object),
            None => not_found(&target.collection, name),
        },
        (method, _) => error(
            405,
            "MethodNotAllowed",
            format!("{method} {path} is not served"),
        ),
    }
}

/// A `/status` write changes only `status`; a main write keeps the stored `status`.
fn only_status_or_not(old: Value, new: Value, status: bool) -> Value {
    if status {
        let mut updated = old;
        updated["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        if updated["status"].is_null()
            && let Value::Object(map) = &mut updated
        {
            map.remove("status");
        }
        updated
    } else {
        let mut updated = new;
        match (old.get("status"), &mut updated) {
            (Some(status), Value::Object(map)) => {
                map.insert("status".into(), status.clone());
            }
            (None, Value::Object(map)) => {
                map.remove("status");
            }
            _ => {}
        }
        updated
    }
}

fn not_found(collection: &Collection, name: &str) -> Response<Body> {
    error(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", collection.resource),
    )
}

fn conflict(collection: &Collection, name: &str) -> Response<Body> {
    error(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            collection.resource
        ),
    )
}

fn in_scope(target: &Target, collection: &Collection, namespace: &str) -> bool {
    *collection == target.collection && target.namespace.as_deref().is_none_or(|ns| ns == namespace)
}

fn list(state: &State, target: &Target, query: &Query) -> Response<Body> {
    let store = state.objects.lock();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((c, ns, _), _)| in_scope(target, c, ns))
        .map(|(_, v)| v)
        .filter(|v| query.selects(v))
        .cloned()
        .collect();
    let revision = store.revision;
    drop(store);
    json_response(
        200,
        &json!({
            "apiVersion": target.collection.api_version(),
            "kind": format!("{}List", state.kind_of(&target.collection)),
            "metadata": {"resourceVersion": revision.to_string()},
            "items": items,
        }),
    )
}

fn watch(state: &Arc<State>, target: &Target, query: &Query) -> Response<Body> {
    state.watches_started.fetch_add(1, Ordering::SeqCst);
    let bookmarks = query.flag("allowWatchBookmarks");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut first: Vec<Bytes> = Vec::new();
    let (receiver, mut last_rv) = {
        let store = state.objects.lock();
        let receiver = state.events.subscribe();
        let start = query
            .get("resourceVersion")
            .and_then(|s| s.parse::<u64>().ok());
        match start {
            Some(rv) if rv > 0 && rv < store.compacted => {
                first.push(watch_line(
                    "ERROR",
                    &status_object(
                        410,
                        "Expired",
                        &format!("too old resource version: {rv} ({})", store.compacted),
                    ),
                ));
                (None, rv)
            }
            Some(rv) if rv > 0 => {
                for event in store.history.iter().filter(|e| e.rv > rv) {
                    if in_scope(target, &event.collection, &event.namespace)
                        && query.selects(&event.object)
                    {
                        first.push(watch_line(event.kind, &event.object));
                    }
                }
                (Some(receiver), store.revision)
            }
            // No version: the current state first, then changes.
            _ => {
                for ((c, ns, _), object) in &store.objects {
                    if in_scope(target, c, ns) && query.selects(object) {
                        first.push(watch_line("ADDED", object));
                    }
                }
                (Some(receiver), store.revision)
            }
        }
    };
    let kind = state.kind_of(&target.collection);
    let api_version = target.collection.api_version();
    let bookmark = move |rv: u64| {
        watch_line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}),
        )
    };
    if bookmarks && receiver.is_some() {
        first.push(bookmark(last_rv));
    }
    let target = Target {
        collection: target.collection.clone(),
        namespace: target.namespace.clone(),
        name: None,
        subresource: None,
    };
    let labels = query.get("labelSelector").map(str::to_string);
    let fields = query.get("fieldSelector").map(str::to_string);
    let mut stopped = state.shutdown.subscribe();
    tokio::spawn(async move {
        for line in first {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(mut receiver) = receiver else { return };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let msg = tokio::select! {
                _ = stopped.changed() => return,
                () = &mut deadline => return,
                msg = receiver.recv() => msg,
            };
            let line = match msg {
                Ok(WatchMsg::Event(event)) => {
                    if event.rv <= last_rv
                        || !in_scope(&target, &event.collection, &event.namespace)
                        || labels
                            .as_deref()
                            .is_some_and(|s| !matches_labels(&event.object, s))
                        || fields
                            .as_deref()
                            .is_some_and(|s| !matches_fields(&event.object, s))
                    {
                        continue;
                    }
                    last_rv = event.rv;
                    watch_line(event.kind, &event.object)
                }
                Ok(WatchMsg::Bookmark) if bookmarks => bookmark(last_rv),
                Ok(WatchMsg::Bookmark) => continue,
                Ok(WatchMsg::Break(line)) => {
                    let _ = tx.send(line).await;
                    return;
                }
                // A watch that fell behind is told to start again, as etcd would.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx
                        .send(watch_line(
                            "ERROR",
                            &status_object(410, "Expired", "the watch fell behind"),
                        ))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(|line| Ok::<_, Infallible>(Frame::data(line)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_match_the_rest_mapping() {
        for (kind, want) in [
            ("Pod", "pods"),
            ("Service", "services"),
            ("EndpointSlice", "endpointslices"),
            ("Endpoints", "endpoints"),
            ("Canary", "canaries"),
            ("DestinationPolicy", "destinationpolicies"),
            ("MeshConfig", "meshconfigs"),
            ("Lease", "leases"),
            ("Ingress", "ingresses"),
            ("Gateway", "gateways"),
        ] {
            assert_eq!(plural(kind), want);
        }
    }

    #[test]
    fn paths_parse_core_group_namespaced_and_cluster_wide() {
        let t = parse_path("/api/v1/namespaces/shop/pods/web-1/status").unwrap();
        assert_eq!(t.collection.resource, "pods");
        assert_eq!(t.namespace.as_deref(), Some("shop"));
        assert_eq!(t.name.as_deref(), Some("web-1"));
        assert_eq!(t.subresource.as_deref(), Some("status"));
        let t = parse_path("/apis/trellis.dev/v1alpha1/canaries").unwrap();
        assert_eq!(t.collection.group, "trellis.dev");
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = parse_path("/api/v1/namespaces/shop").unwrap();
        assert_eq!(
            (t.collection.resource.as_str(), t.name.as_deref()),
            ("namespaces", Some("shop"))
        );
    }

    #[test]
    fn merge_and_json_patches() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(&mut v, &json!({"a": {"b": null, "d": 3}}));
        assert_eq!(v, json!({"a": {"c": 2, "d": 3}, "l": [1, 2]}));
        json_patch(&mut v, &json!([{"op": "add", "path": "/l/-", "value": 3}, {"op": "replace", "path": "/a/c", "value": 9}])).unwrap();
        assert_eq!(v, json!({"a": {"c": 9, "d": 3}, "l": [1, 2, 3]}));
        assert!(json_patch(&mut v, &json!([{"op": "test", "path": "/a/c", "value": 1}])).is_err());
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"name": "x", "labels": {"app": "web", "v": "1"}}});
        assert!(matches_labels(&o, "app=web,v!=2"));
        assert!(!matches_labels(&o, "app=api"));
        assert!(matches_labels(&o, "app,!missing"));
        assert!(matches_fields(&o, "metadata.name=x"));
        assert!(!matches_fields(&o, "metadata.name!=x"));
        assert_eq!(decode("a%3Db%2Cc"), "a=b,c");
    }
}
