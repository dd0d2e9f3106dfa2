//! What a manifests load rejects, located as precisely as the problem allows.

use std::fmt;
use std::path::PathBuf;

/// One rejected file, document or field of a manifests directory.
///
/// Displays as `deploy/x.yaml: document 2: Service default/hostnames: spec.ports[0].port: 70000
/// is out of range 1..=65535`, leaving out the parts that do not apply (a YAML syntax error
/// names the file and line instead of a document).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The file, as found in the directory (or the directory itself when it cannot be listed).
    pub file: PathBuf,
    /// The 1-based line, for YAML syntax errors.
    pub line: Option<u64>,
    /// The 1-based index of the document in the file (`---` separated; empty ones count).
    pub document: Option<usize>,
    /// The object, like `Service default/hostnames`, or `<unnamed>` when it has no name.
    pub object: Option<String>,
    /// A JSON path into the object, like `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl ManifestError {
    /// An error about a whole file (unreadable, not YAML).
    pub(crate) fn file(
        file: impl Into<PathBuf>,
        line: Option<u64>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            line,
            document: None,
            object: None,
            field: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ": line {line}")?;
        }
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}
