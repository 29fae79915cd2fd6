//! Configuration problems: each located by file and key, all of them collected before a
//! configuration is refused.

use std::fmt;
use std::path::{Path, PathBuf};

/// One configuration problem, located by file and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// The key path inside it, e.g. `mappings[1].fields.county_code`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// All problems found in a configuration.
#[derive(Debug, Clone, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, file: &Path, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl From<Problems> for crate::Error {
    fn from(p: Problems) -> Self {
        crate::Error::Config(p.to_string())
    }
}
