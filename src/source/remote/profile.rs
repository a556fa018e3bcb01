//! The AWS shared configuration files (`~/.aws/credentials`, `~/.aws/config`) for the profile
//! `AWS_PROFILE` names (else `default`): static keys, session token, region and endpoint.
//!
//! `object_store` reads the `AWS_*` variables but not these files, which is where most users
//! keep their keys. The rules follow the AWS CLI: a variable wins over a file; the credentials
//! file's `[name]` section wins over the config file's `[profile name]` (`[default]` in both);
//! `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` move the files. What the CLI resolves by
//! running something (`credential_process`, `sso_*`, `role_arn`) is refused by name rather
//! than ignored, so a profile never silently signs with the wrong identity.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::RemoteError;

/// Settings read from the files for one profile; `None` where neither file sets them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    /// `aws_access_key_id`.
    pub access_key_id: Option<String>,
    /// `aws_secret_access_key`.
    pub secret_access_key: Option<String>,
    /// `aws_session_token`.
    pub session_token: Option<String>,
    /// `region`.
    pub region: Option<String>,
    /// `endpoint_url` (MinIO, Ceph, a local server).
    pub endpoint_url: Option<String>,
}

/// Keys whose value the AWS CLI obtains by running or assuming something: not supported here.
const UNSUPPORTED: [&str; 5] = [
    "credential_process",
    "role_arn",
    "sso_start_url",
    "sso_session",
    "web_identity_token_file",
];

/// Where the files are and which profile to read, from the environment and `$HOME`.
#[derive(Debug, Clone)]
pub struct ProfileFiles {
    /// The profile's name (`AWS_PROFILE`, else `default`).
    pub name: String,
    /// Whether the name came from `AWS_PROFILE` (then the profile must exist).
    pub named: bool,
    /// The credentials file and whether a variable named it (then it must be readable).
    pub credentials: Option<(PathBuf, bool)>,
    /// The config file and whether a variable named it.
    pub config: Option<(PathBuf, bool)>,
}

impl ProfileFiles {
    /// The files and profile the process environment points at.
    pub fn from_env() -> ProfileFiles {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from);
        let file = |key: &str, default: &str| match var(key) {
            Some(path) => Some((PathBuf::from(path), true)),
            None => home.as_ref().map(|h| (h.join(".aws").join(default), false)),
        };
        let profile = var("AWS_PROFILE");
        ProfileFiles {
            named: profile.is_some(),
            name: profile.unwrap_or_else(|| "default".to_owned()),
            credentials: file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            config: file("AWS_CONFIG_FILE", "config"),
        }
    }

    /// Reads the profile: `Ok(None)` when no file has it and nothing required it.
    pub fn read(&self) -> Result<Option<Profile>, RemoteError> {
        let read = |file| read_ini(file).map_err(|message| self.error(message));
        let credentials = read(self.credentials.as_ref())?;
        let config = read(self.config.as_ref())?;
        let config_section = if self.name == "default" {
            "default".to_owned()
        } else {
            format!("profile {}", self.name)
        };
        let sections = [
            credentials.get(&self.name).map(|s| (s, &self.credentials)),
            config.get(&config_section).map(|s| (s, &self.config)),
        ];
        if sections.iter().all(Option::is_none) {
            if self.named {
                return Err(self.error(format!(
                    "AWS_PROFILE={} names a profile that is in neither {}",
                    self.name,
                    self.describe()
                )));
            }
            return Ok(None);
        }
        let mut profile = Profile::default();
        for (section, file) in sections.into_iter().flatten() {
            let file = file.as_ref().map(|(p, _)| p.display().to_string());
            if let Some(key) = UNSUPPORTED.iter().find(|k| section.contains_key(**k)) {
                return Err(self.error(format!(
                    "profile {:?} in {} uses `{key}`, which ringfeed does not run: give static \
                     keys (aws_access_key_id / aws_secret_access_key / aws_session_token) in \
                     the profile or in the AWS_* variables",
                    self.name,
                    file.unwrap_or_default()
                )));
            }
            let take = |slot: &mut Option<String>, key: &str| {
                if slot.is_none() {
                    *slot = section.get(key).cloned();
                }
            };
            take(&mut profile.access_key_id, "aws_access_key_id");
            take(&mut profile.secret_access_key, "aws_secret_access_key");
            take(&mut profile.session_token, "aws_session_token");
            take(&mut profile.region, "region");
            take(&mut profile.endpoint_url, "endpoint_url");
        }
        Ok(Some(profile))
    }

    fn describe(&self) -> String {
        let name = |f: &Option<(PathBuf, bool)>| {
            f.as_ref()
                .map_or("<no $HOME>".to_owned(), |(p, _)| p.display().to_string())
        };
        format!("{} nor {}", name(&self.credentials), name(&self.config))
    }

    fn error(&self, message: String) -> RemoteError {
        RemoteError::Profile {
            profile: self.name.clone(),
            message,
        }
    }
}

/// Sections of an INI file: `[name]` → key → value (keys lower-cased, values trimmed; `#` and
/// `;` start comment lines). A missing file that no variable named is empty.
fn read_ini(
    file: Option<&(PathBuf, bool)>,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let Some((path, named)) = file else {
        return Ok(BTreeMap::new());
    };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_ini(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(BTreeMap::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn parse_ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn files(dir: &Path, name: Option<&str>) -> ProfileFiles {
        ProfileFiles {
            name: name.unwrap_or("default").to_owned(),
            named: name.is_some(),
            credentials: Some((dir.join("credentials"), false)),
            config: Some((dir.join("config"), false)),
        }
    }

    #[test]
    fn credentials_file_wins_over_config_and_sections_are_per_profile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("credentials"),
            "# keys\n[default]\naws_access_key_id = DEF\naws_secret_access_key = dsecret\n\n\
             [train]\nAWS_ACCESS_KEY_ID=TRAIN\naws_secret_access_key = tsecret\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config"),
            "[default]\nregion = eu-west-1\n[profile train]\nregion = us-east-2\n\
             endpoint_url = http://127.0.0.1:9000\naws_access_key_id = IGNORED\n",
        )
        .unwrap();
        let train = files(dir.path(), Some("train")).read().unwrap().unwrap();
        assert_eq!(
            train,
            Profile {
                access_key_id: Some("TRAIN".into()),
                secret_access_key: Some("tsecret".into()),
                session_token: None,
                region: Some("us-east-2".into()),
                endpoint_url: Some("http://127.0.0.1:9000".into()),
            }
        );
        let default = files(dir.path(), None).read().unwrap().unwrap();
        assert_eq!(default.access_key_id.as_deref(), Some("DEF"));
        assert_eq!(default.region.as_deref(), Some("eu-west-1"));
        assert_eq!(default.endpoint_url, None);
    }

    #[test]
    fn a_named_missing_profile_and_run_time_credentials_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("credentials"), "[default]\nx = 1\n").unwrap();
        std::fs::write(
            dir.path().join("config"),
            "[profile sso]\nsso_start_url = https://example\n",
        )
        .unwrap();
        let err = files(dir.path(), Some("nope")).read().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("AWS_PROFILE=nope") && text.contains("credentials"),
            "{text}"
        );
        let err = files(dir.path(), Some("sso")).read().unwrap_err();
        assert!(err.to_string().contains("`sso_start_url`"), "{err}");
    }

    #[test]
    fn absent_default_files_are_no_profile_but_a_named_unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(files(dir.path(), None).read().unwrap(), None);
        let named = ProfileFiles {
            credentials: Some((dir.path().join("missing"), true)),
            ..files(dir.path(), None)
        };
        let err = named.read().unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
