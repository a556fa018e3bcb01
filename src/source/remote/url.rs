//! `s3://bucket/key` URLs (and `gs://bucket/key`, `az://container/key`), and shard specs over
//! them (brace ranges and globs, as for local shards: braces expand here, globs are matched
//! against a listing of the key's literal prefix).

use std::fmt;

use super::error::RemoteError;
use super::store::{RemoteObject, Store};
use crate::source::spec::expand_braces;

/// The scheme of S3 shards.
pub const S3_SCHEME: &str = "s3://";

/// The object store a URL names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// `s3://`: AWS S3 and S3-compatible stores (tested against moto_server).
    #[default]
    S3,
    /// `gs://`: Google Cloud Storage (untested: no emulator in the test suite).
    Gcs,
    /// `az://`: Azure Blob Storage, the bucket being the container (untested likewise).
    Azure,
}

impl Scheme {
    const ALL: [Scheme; 3] = [Scheme::S3, Scheme::Gcs, Scheme::Azure];

    /// The URL prefix, `s3://`, `gs://` or `az://`.
    pub fn prefix(self) -> &'static str {
        match self {
            Scheme::S3 => S3_SCHEME,
            Scheme::Gcs => "gs://",
            Scheme::Azure => "az://",
        }
    }

    /// The scheme `url` starts with, if any.
    pub fn of(url: &str) -> Option<Scheme> {
        Scheme::ALL
            .into_iter()
            .find(|s| url.starts_with(s.prefix()))
    }
}

/// True for a shard spec naming objects (`s3://…`, `gs://…`, `az://…`) rather than local
/// files.
pub fn is_remote(spec: &str) -> bool {
    Scheme::of(spec).is_some()
}

/// One object's address: a store, a bucket and a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectUrl {
    /// The store (`s3://` unless said otherwise).
    pub scheme: Scheme,
    /// The bucket.
    pub bucket: String,
    /// The key inside the bucket (no leading `/`).
    pub key: String,
}

impl ObjectUrl {
    /// Parses `s3://bucket/key` (or `gs://`, `az://`); the key must not be empty.
    pub fn parse(url: &str) -> Result<ObjectUrl, RemoteError> {
        let bad = |reason: &str| RemoteError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let scheme =
            Scheme::of(url).ok_or_else(|| bad("does not start with s3://, gs:// or az://"))?;
        let rest = &url[scheme.prefix().len()..];
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("names no key after the bucket"))?;
        if bucket.is_empty()
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(bad(
                "the bucket name is empty or holds characters S3 does not allow",
            ));
        }
        if key.is_empty() || key.starts_with('/') {
            return Err(bad("the key is empty or starts with '/'"));
        }
        Ok(ObjectUrl {
            scheme,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }
}

impl ObjectUrl {
    /// The bucket as a URL, `s3://bucket`: how errors name it.
    pub fn bucket_url(&self) -> String {
        format!("{}{}", self.scheme.prefix(), self.bucket)
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}/{}", self.scheme.prefix(), self.bucket, self.key)
    }
}

fn is_glob(key: &str) -> bool {
    key.contains(['*', '?', '['])
}

/// Expands remote shard specs into the sorted, deduplicated objects they name: brace
/// expressions expand first; a key with `*`, `?` or `[…]` lists the bucket under the key's
/// literal directory and keeps the keys the glob matches (`*` does not cross `/`); any other
/// key must exist. A spec matching nothing is an error naming it.
pub fn expand_remote(specs: &[String], store: &Store) -> Result<Vec<RemoteObject>, RemoteError> {
    let mut objects = Vec::new();
    for spec in specs {
        let patterns = expand_braces(spec).map_err(|reason| RemoteError::BadUrl {
            url: spec.clone(),
            reason,
        })?;
        let before = objects.len();
        for pattern in patterns {
            let url = ObjectUrl::parse(&pattern)?;
            if !is_glob(&url.key) {
                objects.push(store.head(&url)?);
                continue;
            }
            let glob = glob::Pattern::new(&url.key).map_err(|e| RemoteError::BadUrl {
                url: pattern.clone(),
                reason: e.to_string(),
            })?;
            let literal = &url.key[..url.key.find(['*', '?', '[']).unwrap_or(url.key.len())];
            let dir = &literal[..literal.rfind('/').map_or(0, |i| i + 1)];
            let options = glob::MatchOptions {
                require_literal_separator: true,
                ..glob::MatchOptions::new()
            };
            objects.extend(
                store
                    .list(url.scheme, &url.bucket, dir)?
                    .into_iter()
                    .filter(|o| glob.matches_with(&o.url.key, options)),
            );
        }
        if objects.len() == before {
            return Err(RemoteError::NoMatch { spec: spec.clone() });
        }
    }
    objects.sort_by(|a, b| a.url.cmp(&b.url));
    objects.dedup_by(|a, b| a.url == b.url);
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_named() {
        let url = ObjectUrl::parse("s3://data-1/train/shard-000.tar").unwrap();
        assert_eq!(
            (url.bucket.as_str(), url.key.as_str()),
            ("data-1", "train/shard-000.tar")
        );
        assert_eq!(url.to_string(), "s3://data-1/train/shard-000.tar");
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "http://b/k",
            "s3://b b/k",
        ] {
            let err = ObjectUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        assert!(is_remote("s3://b/k") && !is_remote("data/s3://x"));
        let gs = ObjectUrl::parse("gs://b/k.tar").unwrap();
        assert_eq!(
            (gs.scheme, gs.to_string().as_str()),
            (Scheme::Gcs, "gs://b/k.tar")
        );
        assert_eq!(ObjectUrl::parse("az://c/k").unwrap().scheme, Scheme::Azure);
    }
}
