//! Object storage, blocking: local directories and `s3://`, `gs://`, `az://` (or `abfs://`) URLs through the
//! `object_store` crate, behind one small synchronous API for code that runs on plain threads (the data
//! prefetcher, checkpoint writers).
//!
//! Credentials and endpoints come from the usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as
//! the providers' own tools read them) and from explicit options (for example `endpoint` and `allow_http`
//! for an S3-compatible server), explicit options winning.
//!
//! Each [`Store`] owns a small tokio runtime and blocks on it. Called from inside an async task (an actor's
//! handler), a method runs its I/O on a scoped thread of its own and the task's thread waits for it: safe,
//! but it holds that worker thread for the call's duration.

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A storage failure, reported with the URL. `NotFound` is expected (probing for optional objects).
/// `Unavailable` is transient: the same request may succeed once the store answers again, and a launch waits
/// for it (`launch.storage_wait_s`) instead of counting it as a crash. `Refused` is the user's to fix (a
/// missing bucket, wrong credentials): retrying cannot help. `Backend` is anything else (a local file's I/O,
/// an unexpected response).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{url}: not found")]
    NotFound { url: String },
    #[error("{url}: the store is unavailable ({message})")]
    Unavailable { url: String, message: String },
    #[error("{url}: {message} ({hint})")]
    Refused { url: String, message: String, hint: &'static str },
    #[error("{url}: {message}")]
    Backend { url: String, message: String },
    #[error("{location:?} is not a local path or a supported URL (s3://, gs://, az://, abfs://, file://): {reason}")]
    BadLocation { location: String, reason: String },
}

/// A directory-like place: a local directory or a prefix in a bucket.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// How this store was named, for messages.
    pub location: String,
    rt: Arc<IoRuntime>,
}

/// The store's own I/O runtime. The last store to go may be dropped from inside another runtime (an actor's
/// state), where tokio refuses to block on a runtime's shutdown; there it shuts down in the background.
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            }
        }
    }
}

/// Whether `location` names an object store rather than a local path.
pub fn is_url(location: &str) -> bool {
    location.contains("://")
}

/// Why `location` looks like a mistyped URL (`s3:/bucket/x`, `gs:bucket`), which would otherwise be taken
/// for a local directory of that name: checkpoints written there are lost with the machine's disk.
pub fn mistyped_url(location: &str) -> Option<String> {
    let (scheme, rest) = location.split_once(':')?;
    let looks_like_scheme =
        !scheme.is_empty() && scheme.len() <= 8 && scheme.chars().all(|c| c.is_ascii_alphanumeric());
    (looks_like_scheme && !rest.starts_with("//")).then(|| {
        format!("{location:?} looks like a URL missing a slash; write {scheme}://BUCKET/PATH (or ./{location} for a local directory)")
    })
}

/// Checks option keys against what the URL's object store understands (its own keys and the HTTP
/// client's): a misspelt key (`endpont`) would otherwise be ignored, and the default endpoint used.
fn check_option_keys(url: &url::Url, options: &[(String, String)]) -> Result<(), String> {
    use object_store::{aws::AmazonS3ConfigKey, azure::AzureConfigKey, gcp::GoogleConfigKey, ClientConfigKey};
    for (key, _) in options {
        let known = match url.scheme() {
            "s3" | "s3a" => key.parse::<AmazonS3ConfigKey>().is_ok(),
            "gs" => key.parse::<GoogleConfigKey>().is_ok(),
            "az" | "adl" | "azure" | "abfs" | "abfss" => key.parse::<AzureConfigKey>().is_ok(),
            _ => true,
        } || key.parse::<ClientConfigKey>().is_ok();
        if !known {
            return Err(format!(
                "unknown storage option `{key}` for a {}:// store (for example endpoint, region, allow_http, \
                 access_key_id, timeout)",
                url.scheme()
            ));
        }
    }
    Ok(())
}

impl Store {
    /// Opens `location`: a local directory path, or a URL. `options` are object-store configuration keys
    /// (`endpoint`, `allow_http`, `access_key_id`, `region`, ...) that override the environment.
    ///
    /// # Errors
    /// [`StorageError::BadLocation`] for an unparseable URL or an unsupported scheme.
    pub fn open(location: &str, options: &[(String, String)]) -> Result<Self, StorageError> {
        let bad = |reason: String| StorageError::BadLocation { location: location.into(), reason };
        let url = if is_url(location) {
            url::Url::parse(location).map_err(|e| bad(e.to_string()))?
        } else {
            let abs = std::path::absolute(location).map_err(|e| bad(e.to_string()))?;
            url::Url::from_directory_path(&abs).map_err(|_| bad("not an absolute directory path".into()))?
        };
        check_option_keys(&url, options).map_err(bad)?;
        let prefixes = ["aws_", "google_", "azure_"];
        let mut opts: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| prefixes.iter().any(|p| k.to_ascii_lowercase().starts_with(p)))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        opts.extend(options.iter().cloned());
        let (inner, prefix) = object_store::parse_url_opts(&url, opts).map_err(|e| bad(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Store { inner: Arc::from(inner), prefix, location: location.into(), rt: Arc::new(IoRuntime(Some(rt))) })
    }

    /// Runs `fut` to completion on this store's I/O runtime. A thread that already drives a tokio runtime
    /// (the launcher's actors, a rank's) cannot block on another one (tokio panics), so from there the call
    /// runs on a scoped thread of its own, and this thread waits for it.
    fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt.get().block_on(fut);
        }
        std::thread::scope(|s| s.spawn(|| self.rt.get().block_on(fut)).join())
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    fn path(&self, name: &str) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in name.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    fn url(&self, name: &str) -> String {
        format!("{}/{}", self.location.trim_end_matches('/'), name)
    }

    fn map_err(&self, name: &str, e: object_store::Error) -> StorageError {
        let url = self.url(name);
        match classify(&e) {
            Class::NotFound => StorageError::NotFound { url },
            Class::Unavailable => StorageError::Unavailable { url, message: e.to_string() },
            Class::Refused(hint) => StorageError::Refused { url, message: e.to_string(), hint },
            Class::Other => StorageError::Backend { url, message: e.to_string() },
        }
    }

    /// The whole object `name` (relative to the store's prefix).
    ///
    /// # Errors
    /// `NotFound` or a backend error.
    pub fn get(&self, name: &str) -> Result<Bytes, StorageError> {
        let path = self.path(name);
        self.block_on(async {
            let r = self.inner.get(&path).await.map_err(|e| self.map_err(name, e))?;
            r.bytes().await.map_err(|e| self.map_err(name, e))
        })
    }

    /// Streams object `name` into the local file `dest` (created or truncated), returning the bytes written.
    ///
    /// # Errors
    /// `NotFound`, a backend error, or a local I/O error (as `Backend`, naming `dest`).
    pub fn download(&self, name: &str, dest: &Path) -> Result<u64, StorageError> {
        use std::io::Write;
        let path = self.path(name);
        let local =
            |e: std::io::Error| StorageError::Backend { url: dest.display().to_string(), message: e.to_string() };
        self.block_on(async {
            let r = self.inner.get(&path).await.map_err(|e| self.map_err(name, e))?;
            let mut stream = r.into_stream();
            let mut f = std::io::BufWriter::new(std::fs::File::create(dest).map_err(local)?);
            let mut n = 0u64;
            use futures_util::StreamExt;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.map_err(name, e))?;
                f.write_all(&chunk).map_err(local)?;
                n += chunk.len() as u64;
            }
            let f = f.into_inner().map_err(|e| local(e.into_error()))?;
            f.sync_all().map_err(local)?;
            Ok(n)
        })
    }

    /// Writes object `name` atomically (a single put: readers see the old object or the new one).
    ///
    /// # Errors
    /// A backend error.
    pub fn put(&self, name: &str, data: Bytes) -> Result<(), StorageError> {
        let path = self.path(name);
        self.block_on(async {
            self.inner.put(&path, PutPayload::from_bytes(data)).await.map(|_| ()).map_err(|e| self.map_err(name, e))
        })
    }

    /// Uploads the local file `src` as object `name`, in parts for large files.
    ///
    /// # Errors
    /// A backend error, or a local I/O error naming `src`.
    pub fn upload(&self, src: &Path, name: &str) -> Result<(), StorageError> {
        let data = std::fs::read(src)
            .map_err(|e| StorageError::Backend { url: src.display().to_string(), message: e.to_string() })?;
        const PART: usize = 16 << 20;
        if data.len() <= PART {
            return self.put(name, Bytes::from(data));
        }
        let path = self.path(name);
        self.block_on(async {
            let upload = self.inner.put_multipart(&path).await.map_err(|e| self.map_err(name, e))?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
            w.write(&data);
            w.finish().await.map(|_| ()).map_err(|e| self.map_err(name, e))
        })
    }

    /// Deletes object `name`; deleting what is not there succeeds.
    ///
    /// # Errors
    /// A backend error.
    pub fn delete(&self, name: &str) -> Result<(), StorageError> {
        let path = self.path(name);
        match self.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(name, e)),
        }
    }

    /// Deletes every object under `name/`.
    ///
    /// # Errors
    /// A backend error.
    pub fn delete_prefix(&self, name: &str) -> Result<(), StorageError> {
        use futures_util::StreamExt;
        let path = self.path(name);
        self.block_on(async {
            let mut listing = self.inner.list(Some(&path));
            let mut objects = vec![];
            while let Some(meta) = listing.next().await {
                objects.push(meta.map_err(|e| self.map_err(name, e))?.location);
            }
            for o in objects {
                match self.inner.delete(&o).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.map_err(name, e)),
                }
            }
            Ok(())
        })
    }

    /// The names of the "directories" (common prefixes) directly under the store's prefix.
    ///
    /// # Errors
    /// A backend error.
    pub fn list_dirs(&self) -> Result<Vec<String>, StorageError> {
        let listing =
            self.block_on(self.inner.list_with_delimiter(Some(&self.prefix))).map_err(|e| self.map_err("", e))?;
        Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// Whether object `name` exists.
    ///
    /// # Errors
    /// A backend error other than not-found.
    pub fn exists(&self, name: &str) -> Result<bool, StorageError> {
        let path = self.path(name);
        match self.block_on(self.inner.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.map_err(name, e)),
        }
    }
}

impl StorageError {
    /// Whether the store did not answer, or said it is overloaded or failing: transient.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }
}

/// What an object-store failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    NotFound,
    /// No answer (connection refused or reset, a timeout) or an answer that says "later" (HTTP 5xx, 429,
    /// S3's `SlowDown`).
    Unavailable,
    /// An answer that will not change on retrying, with what to do about it.
    Refused(&'static str),
    Other,
}

const NO_BUCKET: &str = "the bucket does not exist: create it, or correct the bucket's name in the URL";
const CREDENTIALS: &str = "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the storage \
                           options) and the bucket's permissions";

/// Classifies an object-store error. The HTTP client's transport errors are found by type in the error's
/// chain; the status of a response only by its text (`object_store` does not export the type carrying it):
/// `... status code: 503 Service Unavailable: <body>`, where S3's body names its error code.
fn classify(e: &object_store::Error) -> Class {
    use object_store::Error as E;
    // A missing bucket answers 404 like a missing object: told apart by S3's error code in the body.
    let text = e.to_string();
    if text.contains("NoSuchBucket") {
        return Class::Refused(NO_BUCKET);
    }
    match e {
        E::NotFound { .. } => return Class::NotFound,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => return Class::Refused(CREDENTIALS),
        _ => {}
    }
    let status =
        text.split("status code: ").nth(1).and_then(|rest| rest.get(..3)).and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(s) if s >= 500 || s == 429 || s == 408 => return Class::Unavailable,
        Some(401 | 403) => return Class::Refused(CREDENTIALS),
        Some(_) => return Class::Other,
        None => {}
    }
    if ["SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"].iter().any(|c| text.contains(c)) {
        return Class::Unavailable;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            return match http.kind() {
                K::Connect | K::Request | K::Timeout | K::Interrupted => Class::Unavailable,
                _ => Class::Other,
            };
        }
        source = err.source();
    }
    Class::Other
}

/// The default local cache directory for remote data: `$TESSERA_CACHE/shards` or `~/.cache/tessera/shards`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tessera")))
        .unwrap_or_else(|| PathBuf::from(".tessera-cache"))
        .join("shards")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(source: Box<dyn std::error::Error + Send + Sync>) -> object_store::Error {
        object_store::Error::Generic { store: "S3", source }
    }

    fn answered(status_and_body: &str) -> object_store::Error {
        generic(Box::new(std::io::Error::other(format!(
            "Error performing GET http://127.0.0.1:9000/b?list-type=2 in 5ms - Server returned non-2xx status code: \
             {status_and_body}"
        ))))
    }

    #[test]
    fn a_store_that_does_not_answer_or_asks_for_patience_is_unavailable() {
        use object_store::client::{HttpError, HttpErrorKind};
        for kind in [HttpErrorKind::Connect, HttpErrorKind::Timeout, HttpErrorKind::Request] {
            let e = generic(Box::new(HttpError::new(kind, std::io::Error::other("connection refused"))));
            assert_eq!(classify(&e), Class::Unavailable, "{kind:?}");
        }
        assert_eq!(classify(&answered("503 Service Unavailable: <Error><Code>SlowDown</Code>")), Class::Unavailable);
        assert_eq!(classify(&answered("500 Internal Server Error: ")), Class::Unavailable);
        assert_eq!(classify(&answered("429 Too Many Requests: ")), Class::Unavailable);
    }

    #[test]
    fn a_missing_bucket_or_bad_credentials_are_refused_with_what_to_do() {
        let no_bucket = answered("404 Not Found: <Error><Code>NoSuchBucket</Code></Error>");
        assert_eq!(classify(&no_bucket), Class::Refused(NO_BUCKET));
        assert_eq!(classify(&answered("403 Forbidden: <Code>AccessDenied</Code>")), Class::Refused(CREDENTIALS));
        let denied = object_store::Error::PermissionDenied { path: "x".into(), source: "no".into() };
        assert_eq!(classify(&denied), Class::Refused(CREDENTIALS));
        assert_eq!(classify(&answered("400 Bad Request: ")), Class::Other);
        let missing = object_store::Error::NotFound { path: "x".into(), source: "gone".into() };
        assert_eq!(classify(&missing), Class::NotFound);
        // A GET in a bucket that is not there is a 404 too, but not a missing object.
        let in_no_bucket = object_store::Error::NotFound {
            path: "x".into(),
            source: "404 Not Found: <Error><Code>NoSuchBucket</Code></Error>".into(),
        };
        assert_eq!(classify(&in_no_bucket), Class::Refused(NO_BUCKET));
    }
}
