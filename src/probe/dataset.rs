//! Labelled adapters from a JSON-lines manifest.
//!
//! One JSON object per line (blank lines are skipped):
//!
//! ```json
//! {"path": "runs/c3/step5.safetensors", "label": "malicious", "base": "runs/round0.safetensors", "client": "c3", "round": 0, "step": 5}
//! ```
//!
//! * `path` (required): a PEFT LoRA safetensors file. Relative paths are
//!   resolved against the manifest's directory.
//! * `label` (required): `"benign"` or `"malicious"` (or `0` / `1`). Labels
//!   come only from here, never from file names.
//! * `base` (optional): the adapter the run started from; the sample is then
//!   ΔLoRA = `path` − `base` (keys and shapes must match). Without it the file
//!   is taken to hold the delta itself.
//! * `client` (string or integer), `round`, `step` (non-negative integers):
//!   optional ids, carried along for reporting.
//! * `group` (optional, string or integer): the run (or client) the sample
//!   belongs to. Cross-validation keeps every group inside one fold: the
//!   steps of one run are not independent samples, and a fold that trains on
//!   step 4 of a run and tests on its step 5 overstates the probe. Without
//!   `group`, the sample's `client` is its group; without either, the sample
//!   is a group of its own. Group names are compared as strings (`3` and
//!   `"3"` are the same group).
//!
//! Unknown fields are rejected (a typo such as `"lable"` must not silently
//! drop a label). Loading is streaming: the layout is fitted from the files'
//! headers, then each file is read once more and turned straight into its
//! feature row (or sketched row), so memory holds one adapter at a time plus
//! the `[n, dim]` (or `[n, k]`) matrix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::features::{FeatureConfig, FeatureSpec, TransformReport};
use crate::lora::{AdapterView, LazyDelta, LoraKey, ReadLimits, TensorSource, read_file};
use crate::probe::Label;
use crate::probe::sketch::Sketch;

/// One labelled sample of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// 1-based line number in the manifest.
    pub line: usize,
    /// Adapter (or delta) file, resolved against the manifest directory.
    pub path: PathBuf,
    /// The sample's class.
    pub label: Label,
    /// Adapter the run started from, if the file is not a delta itself.
    pub base: Option<PathBuf>,
    /// Client id.
    pub client: Option<String>,
    /// Federated round.
    pub round: Option<u64>,
    /// Local step.
    pub step: Option<u64>,
    /// Group (run or client) for cross-validation, as written in the manifest.
    pub group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    path: PathBuf,
    label: Value,
    #[serde(default)]
    base: Option<PathBuf>,
    #[serde(default)]
    client: Option<Value>,
    #[serde(default)]
    round: Option<u64>,
    #[serde(default)]
    step: Option<u64>,
    #[serde(default)]
    group: Option<Value>,
}

/// A parsed manifest: labelled samples in file order.
///
/// ```
/// use std::path::Path;
/// use safe_fedllm::probe::{Label, Manifest};
///
/// let text = r#"{"path": "a.safetensors", "label": "malicious", "client": 3}
/// {"path": "b.safetensors", "label": "benign", "base": "base.safetensors"}"#;
/// let manifest = Manifest::parse(text, Path::new("/data"))?;
/// assert_eq!(manifest.labels(), [Label::Malicious, Label::Benign]);
/// assert_eq!(manifest.entries()[0].client.as_deref(), Some("3"));
/// assert_eq!(manifest.entries()[1].base.as_deref(), Some(Path::new("/data/base.safetensors")));
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<ManifestEntry>,
    root: PathBuf,
}

impl Manifest {
    /// Parses manifest text; relative paths are resolved against `root`.
    ///
    /// Errors: [`Error::Manifest`] with the line number for bad JSON, a
    /// missing or unknown field, or a bad label; [`Error::Empty`] for a
    /// manifest without entries.
    pub fn parse(text: &str, root: &Path) -> Result<Self> {
        let entries = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| parse_line(i + 1, l, root))
            .collect::<Result<Vec<_>>>()?;
        if entries.is_empty() {
            return Err(Error::Empty { what: "manifest" });
        }
        Ok(Manifest {
            entries,
            root: root.to_owned(),
        })
    }

    /// Reads and parses a manifest file (paths relative to its directory).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path, &ReadLimits::default())?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::in_file(
                path,
                Error::Manifest {
                    line: 0,
                    reason: format!("not UTF-8: {e}"),
                },
            )
        })?;
        let root = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, root).map_err(|e| Error::in_file(path, e))
    }

    /// The folder relative paths were resolved against.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sample_error(&self, entry: &ManifestEntry, source: Error) -> Error {
        Error::ManifestSample {
            line: entry.line,
            path: entry.path.clone(),
            root: self.root.clone(),
            source: Box::new(source),
        }
    }

    /// The samples, in file order.
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    /// The labels, in file order.
    pub fn labels(&self) -> Vec<Label> {
        self.entries.iter().map(|e| e.label).collect()
    }

    /// One dense group index per entry, in file order, for
    /// [`Trainer::fit_grouped`](crate::probe::Trainer::fit_grouped): entries
    /// with the same `group` share an index; an entry without `group` falls
    /// back to its `client`, and one with neither is a group of its own.
    /// Indices are numbered in order of first appearance.
    ///
    /// ```
    /// use std::path::Path;
    /// use safe_fedllm::probe::Manifest;
    ///
    /// let text = r#"{"path": "a", "label": 1, "group": "run-1"}
    /// {"path": "b", "label": 0}
    /// {"path": "c", "label": 1, "group": "run-1"}
    /// {"path": "d", "label": 0, "client": 7}
    /// {"path": "e", "label": 0, "group": 7}"#;
    /// let manifest = Manifest::parse(text, Path::new("."))?;
    /// assert_eq!(manifest.groups(), [0, 1, 0, 2, 2]);
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    pub fn groups(&self) -> Vec<usize> {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut next = 0usize;
        let mut fresh = || {
            next += 1;
            next - 1
        };
        self.entries
            .iter()
            .map(|e| match e.group.as_deref().or(e.client.as_deref()) {
                Some(name) => *ids.entry(name).or_insert_with(&mut fresh),
                None => fresh(),
            })
            .collect()
    }

    /// Freezes the feature layout from the files' headers (no tensor data is
    /// converted).
    pub fn fit_spec(&self, config: &FeatureConfig) -> Result<FeatureSpec> {
        let headers = self
            .entries
            .iter()
            .map(|e| {
                with_file(&e.path, |view| Ok(KeyShapes::of(view)))
                    .map_err(|err| self.sample_error(e, err))
            })
            .collect::<Result<Vec<_>>>()?;
        config.fit(&headers)
    }

    /// One feature row per entry (sketched when `sketch` is given). Layout
    /// keys a file lacks are zero-filled: for training, where the layout is
    /// the union of the files' keys. To score or evaluate, where a missing
    /// probed key is evasion by omission, use
    /// [`Manifest::feature_matrix_with_reports`] and refuse such rows.
    pub fn feature_matrix(
        &self,
        spec: &FeatureSpec,
        sketch: Option<&Sketch>,
    ) -> Result<Array2<f32>> {
        self.feature_matrix_with_reports(spec, sketch)
            .map(|(x, _)| x)
    }

    /// [`Manifest::feature_matrix`] with each row's [`TransformReport`]
    /// (which layout keys the file lacked, in file order).
    pub fn feature_matrix_with_reports(
        &self,
        spec: &FeatureSpec,
        sketch: Option<&Sketch>,
    ) -> Result<(Array2<f32>, Vec<TransformReport>)> {
        let width = sketch.map_or(spec.dim(), Sketch::output_dim);
        let mut x = Array2::<f32>::zeros((self.entries.len(), width));
        let mut reports = Vec::with_capacity(self.entries.len());
        let mut scratch = vec![0.0f32; if sketch.is_some() { spec.dim() } else { 0 }];
        let mut bases = BaseCache::default();
        for (mut row, entry) in x.rows_mut().into_iter().zip(&self.entries) {
            let row = row.as_slice_mut().ok_or(Error::Empty {
                what: "contiguous feature row",
            })?;
            let target: &mut [f32] = if sketch.is_some() {
                &mut scratch
            } else {
                row_ref(row)
            };
            let report = entry_features(entry, spec, &mut bases, target)
                .map_err(|err| self.sample_error(entry, err))?;
            reports.push(report);
            if let Some(sketch) = sketch {
                sketch.project(&scratch, row)?;
            }
        }
        Ok((x, reports))
    }
}

fn row_ref(row: &mut [f32]) -> &mut [f32] {
    row
}

fn parse_line(line: usize, text: &str, root: &Path) -> Result<ManifestEntry> {
    let bad = |reason: String| Error::Manifest { line, reason };
    let raw: RawEntry = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let label = match &raw.label {
        Value::String(s) if s == "benign" => Label::Benign,
        Value::String(s) if s == "malicious" => Label::Malicious,
        Value::Number(n) if n.as_u64() == Some(0) => Label::Benign,
        Value::Number(n) if n.as_u64() == Some(1) => Label::Malicious,
        other => {
            return Err(bad(format!(
                "label {other} is not \"benign\", \"malicious\", 0 or 1"
            )));
        }
    };
    let id = |field: &str, value: Option<Value>| match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(Some(n.to_string())),
        Some(other) => Err(bad(format!("{field} {other} is not a string or integer"))),
    };
    let client = id("client id", raw.client)?;
    let group = id("group", raw.group)?;
    Ok(ManifestEntry {
        line,
        path: root.join(raw.path),
        label,
        base: raw.base.map(|b| root.join(b)),
        client,
        round: raw.round,
        step: raw.step,
        group,
    })
}

/// Reads a safetensors file and runs `f` on its validated view; content
/// errors come wrapped with the path.
fn with_file<T>(path: &Path, f: impl FnOnce(&AdapterView<'_>) -> Result<T>) -> Result<T> {
    let bytes = read_file(path, &ReadLimits::default())?;
    let view = AdapterView::parse(&bytes).map_err(|e| Error::in_file(path, e))?;
    f(&view).map_err(|e| Error::in_file(path, e))
}

/// Base adapters' bytes, read once per distinct path.
#[derive(Default)]
struct BaseCache {
    bytes: HashMap<PathBuf, Vec<u8>>,
}

fn entry_features(
    entry: &ManifestEntry,
    spec: &FeatureSpec,
    bases: &mut BaseCache,
    out: &mut [f32],
) -> Result<TransformReport> {
    let base_bytes = match &entry.base {
        None => None,
        Some(path) => {
            if !bases.bytes.contains_key(path) {
                let bytes = read_file(path, &ReadLimits::default())?;
                bases.bytes.insert(path.clone(), bytes);
            }
            bases.bytes.get(path).map(|b| (path, b))
        }
    };
    with_file(&entry.path, |update| match base_bytes {
        None => spec.transform_into(update, out),
        Some((base_path, bytes)) => {
            let base = AdapterView::parse(bytes).map_err(|e| Error::in_file(base_path, e))?;
            let delta = LazyDelta::new(update, &base)?;
            spec.transform_into(&delta, out)
        }
    })
}

/// Keys and shapes of a file, without data: enough to fit a layout.
struct KeyShapes {
    keys: Vec<LoraKey>,
    shapes: BTreeMap<String, [usize; 2]>,
}

impl KeyShapes {
    fn of(view: &AdapterView<'_>) -> Self {
        let keys: Vec<LoraKey> = view.lora_keys().cloned().collect();
        let shapes = keys
            .iter()
            .filter_map(|k| {
                view.shape_of(k.canonical())
                    .map(|s| (k.canonical().to_owned(), s))
            })
            .collect();
        KeyShapes { keys, shapes }
    }
}

impl TensorSource for KeyShapes {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        Box::new(self.keys.iter())
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.shapes.get(canonical).copied()
    }

    fn read_range(&self, canonical: &str, _offset: usize, _out: &mut [f32]) -> Result<()> {
        Err(Error::MissingKey {
            tensor: canonical.to_owned(),
            present_in: "the file header",
            missing_from: "a header-only source (which holds no tensor data)",
        })
    }
}
