//! Sidecar indexes of remote shards kept in the bucket, beside their shard: a daemon on a
//! new node reads the index instead of fetching the whole shard to build it.
//!
//! The index file is opaque here: its bytes are what [`crate::source::index`] writes to the
//! local index directory, copied to `<key><suffix>` ([`index_url`]) and back. Whether a copy
//! fits the object (size, last-modified) is for the index module to judge when it reads the
//! local file. A bucket this client may not write (read-only credentials, a public dataset) is
//! remembered, and its indexes stay in the local index directory only.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::error::RemoteError;
use super::store::{RemoteObject, Store};
use super::url::ObjectUrl;
use crate::source::index::{index_path_beside, max_index_bytes};

/// Where the sidecar index of `object` lives in its bucket: the key plus the index module's
/// suffix (as a local shard's index lies beside it).
pub fn index_url(object: &RemoteObject) -> ObjectUrl {
    ObjectUrl {
        scheme: object.url.scheme,
        bucket: object.url.bucket.clone(),
        key: index_path_beside(Path::new(&object.url.key))
            .to_string_lossy()
            .into_owned(),
    }
}

/// Copies the bucket's sidecar index of `object` to `local` (written to a temporary name,
/// then renamed). Returns false when the bucket has none.
pub fn download(store: &Store, object: &RemoteObject, local: &Path) -> Result<bool, RemoteError> {
    let url = index_url(object);
    let Some(bytes) = store.get_small(&url, max_index_bytes(object.size))? else {
        return Ok(false);
    };
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RemoteError::Cache { path, source }
    };
    let dir = local.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(cache_err(dir))?;
    let mut temp_name = local.as_os_str().to_owned();
    temp_name.push(format!(".download-{}", std::process::id()));
    let temp = std::path::PathBuf::from(temp_name);
    let written = fs::File::create(&temp)
        .and_then(|mut f| f.write_all(&bytes))
        .and_then(|()| fs::rename(&temp, local));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written.map_err(cache_err(local)).map(|()| true)
}

/// Copies the local index file `local` of `object` into the bucket beside it. A refusal
/// (read-only bucket) is [`RemoteError::Credentials`]: the caller keeps the local index.
pub fn upload(store: &Store, object: &RemoteObject, local: &Path) -> Result<(), RemoteError> {
    let bytes = fs::read(local).map_err(|source| RemoteError::Cache {
        path: local.to_path_buf(),
        source,
    })?;
    store.put(&index_url(object), bytes)
}
