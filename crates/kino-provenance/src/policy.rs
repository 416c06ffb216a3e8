//! The operator's prompt policy: blocked terms and regular expressions, each with the reason
//! shown to the person whose request is refused; refusals are appended to an audit log.
//!
//! The file is TOML:
//!
//! ```toml
//! # Where refusals are logged (JSON lines); default: policy-audit.jsonl in the data directory.
//! audit_log = "/var/log/kino/refused.jsonl"
//!
//! [[block]]
//! term = "example public figure"   # matched as whole words, any case
//! reason = "videos of real public figures are not allowed on this server"
//!
//! [[block]]
//! pattern = "(?i)\\bnude\\b"        # a regular expression (Rust regex syntax)
//! reason = "sexual content is not allowed"
//! ```
//!
//! `kino generate`, `kino extend` and `kino serve` all call [`Policy::check_prompt`].
//! [`Policy::check_image`] is where a check of image inputs (for example, photos of real
//! people) would go; it allows every image today.

use std::io::Write;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use crate::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default)]
    block: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    term: Option<String>,
    #[serde(default)]
    pattern: Option<String>,
    reason: String,
}

/// One rule: what it matches and why.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `term: …` or `pattern: …`, as the audit log records it.
    pub name: String,
    pub reason: String,
    regex: Regex,
}

/// A loaded policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub path: PathBuf,
    pub rules: Vec<Rule>,
    pub audit_log: PathBuf,
}

/// A refused request: the rule and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the prompt was refused by this installation's content policy: {}",
            self.reason
        )
    }
}

impl Policy {
    /// Reads a policy file; `default_audit_log` is used when the file names none.
    pub fn load(path: &Path, default_audit_log: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the policy file {}: {e}",
                path.display()
            ))
        })?;
        let file: PolicyFile = toml::from_str(&text).map_err(|e| {
            Error::Config(format!(
                "the policy file {} is not valid: {e}; each [[block]] has a `term` or a \
                 `pattern`, and a `reason`",
                path.display()
            ))
        })?;
        let mut rules = Vec::new();
        for (i, r) in file.block.into_iter().enumerate() {
            let n = i + 1;
            if r.reason.trim().is_empty() {
                return Err(Error::Config(format!(
                    "rule {n} in {} has an empty reason; say why such prompts are refused",
                    path.display()
                )));
            }
            let (name, regex) = match (r.term, r.pattern) {
                (Some(t), None) => {
                    if t.trim().is_empty() {
                        return Err(Error::Config(format!(
                            "rule {n} in {} has an empty term",
                            path.display()
                        )));
                    }
                    // Whole words, any case, any run of spaces between the words.
                    let words: Vec<String> = t.split_whitespace().map(regex::escape).collect();
                    let re = format!(r"(?i)(^|\W){}($|\W)", words.join(r"\s+"));
                    (
                        format!("term: {t}"),
                        Regex::new(&re).map_err(|e| Error::Config(e.to_string()))?,
                    )
                }
                (None, Some(p)) => {
                    let re = Regex::new(&p).map_err(|e| {
                        Error::Config(format!(
                            "rule {n} in {}: the pattern `{p}` is not a valid regular \
                             expression: {e}",
                            path.display()
                        ))
                    })?;
                    (format!("pattern: {p}"), re)
                }
                _ => {
                    return Err(Error::Config(format!(
                        "rule {n} in {} needs exactly one of `term` or `pattern`",
                        path.display()
                    )))
                }
            };
            rules.push(Rule {
                name,
                reason: r.reason,
                regex,
            });
        }
        let audit_log = match file.audit_log {
            Some(p) if p.is_relative() => path.parent().unwrap_or(Path::new(".")).join(p),
            Some(p) => p,
            None => default_audit_log.to_path_buf(),
        };
        Ok(Policy {
            path: path.to_path_buf(),
            rules,
            audit_log,
        })
    }

    /// The first rule `prompt` breaks, if any.
    pub fn find(&self, prompt: &str) -> Option<Refusal> {
        self.rules
            .iter()
            .find(|r| r.regex.is_match(prompt))
            .map(|r| Refusal {
                rule: r.name.clone(),
                reason: r.reason.clone(),
            })
    }

    /// Checks a prompt; a refusal is appended to the audit log (time, source, rule, reason,
    /// the prompt) before it is returned. `source` says who asked ("cli generate",
    /// "server POST /v1/videos", …).
    pub fn check_prompt(&self, prompt: &str, source: &str) -> std::result::Result<(), Refusal> {
        let Some(refusal) = self.find(prompt) else {
            return Ok(());
        };
        if let Err(e) = self.log(&refusal, prompt, source) {
            tracing::error!("cannot write the policy audit log: {e}");
        }
        Err(refusal)
    }

    /// Where a check of image inputs would go (e.g. refusing photos of real people); every
    /// image is allowed today. `role` is `image`, `last_image` or `video frame`.
    pub fn check_image(
        &self,
        _frame: &kino_media::Frame,
        _role: &str,
        _source: &str,
    ) -> std::result::Result<(), Refusal> {
        Ok(())
    }

    fn log(&self, r: &Refusal, prompt: &str, source: &str) -> Result<()> {
        if let Some(dir) = self.audit_log.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| Error::Io(e.to_string()))?;
            }
        }
        let line = serde_json::json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "source": source,
            "rule": r.rule,
            "reason": r.reason,
            "prompt": prompt,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_log)
            .map_err(|e| Error::Io(format!("cannot open {}: {e}", self.audit_log.display())))?;
        writeln!(f, "{line}").map_err(|e| Error::Io(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> (tempfile::TempDir, Result<Policy>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("policy.toml");
        std::fs::write(&p, text).unwrap();
        let log = dir.path().join("audit.jsonl");
        let r = Policy::load(&p, &log);
        (dir, r)
    }

    #[test]
    fn terms_match_whole_words_in_any_case() {
        let (_d, p) = policy(
            "[[block]]\nterm = \"Famous  Person\"\nreason = \"no real people\"\n\
             [[block]]\npattern = \"(?i)gore+\"\nreason = \"no gore\"\n",
        );
        let p = p.unwrap();
        assert_eq!(
            p.find("a FAMOUS person dancing").unwrap().reason,
            "no real people"
        );
        assert!(p.find("a famous personality").is_none());
        assert_eq!(p.find("GOREE").unwrap().rule, "pattern: (?i)gore+");
        assert!(p.find("a corgi surfing").is_none());
    }

    #[test]
    fn refusals_are_logged_as_json_lines() {
        let (d, p) = policy("[[block]]\nterm = \"forbidden\"\nreason = \"because\"\n");
        let p = p.unwrap();
        assert!(p.check_prompt("fine", "test").is_ok());
        let r = p.check_prompt("a forbidden thing", "test").unwrap_err();
        assert_eq!(r.reason, "because");
        let log = std::fs::read_to_string(d.path().join("audit.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["rule"], "term: forbidden");
        assert_eq!(lines[0]["source"], "test");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let (_d, p) = policy("[[block]]\nterm = \"x\"\n");
        assert!(p.unwrap_err().to_string().contains("reason"));
        let (_d, p) = policy("[[block]]\npattern = \"(\"\nreason = \"r\"\n");
        assert!(p.unwrap_err().to_string().contains("not a valid regular"));
        let (_d, p) = policy("[[block]]\nterm = \"a\"\npattern = \"b\"\nreason = \"r\"\n");
        assert!(p.unwrap_err().to_string().contains("exactly one"));
    }
}
