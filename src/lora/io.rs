//! safetensors input and output.
//!
//! Untrusted bytes are checked in layers before any large allocation: the
//! input size against [`ReadLimits::max_bytes`], the declared header length
//! against [`ReadLimits::max_header_bytes`], then the `safetensors` crate's own
//! validation (offsets contiguous, sizes consistent with shapes with checked
//! arithmetic, no trailing bytes), then per-tensor checks here (LoRA tensors
//! are 2-D F32/F16/BF16).
//!
//! Why the `safetensors` crate's parser rather than an own one: it is the
//! parser every PyTorch/PEFT loader uses (so the server reads a file exactly
//! as the ecosystem does: no parser differential an attacker could exploit),
//! it is fuzzed upstream, and the own parser it replaced saved ~0.1–0.2 ms per
//! 128-tensor Llama-8B-shaped upload (criterion, 2 shared cores under load
//! 2.6–5: `AdapterView::parse` 67 µs with the own parser, ~200 µs with this
//! one; parse + first-layer-B features 165 µs → ~380 µs), far below the
//! time to receive the 7–14 MB upload itself, and no fuzz campaign of the
//! own parser justified keeping a second parser of untrusted bytes. Duplicate tensor names are
//! refused when their byte ranges differ (a gap: `InvalidOffset`); an exact
//! duplicate entry is read as one tensor, as every safetensors loader reads it.
//!
//! [`AdapterView`] borrows the caller's buffer and converts a tensor to `f32`
//! only when asked, writing straight into the caller's slice: each value is
//! copied exactly once.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use safetensors::{Dtype, View};

use crate::error::{Error, MalformedSafetensors, Result};
use crate::lora::adapter::{LoraAdapter, LoraConfig, check_ranks};
pub use crate::lora::codec::StorageDtype;
use crate::lora::codec::{decode_into, dtype_width, encode};
use crate::lora::key::LoraKey;
use crate::lora::source::{TensorSource, checked_range};
use crate::lora::tensor::{ExtraTensor, LoraTensor};

/// Size limits applied before parsing untrusted bytes.
///
/// The defaults are sized for LoRA uploads, not for base models:
///
/// | adapter (LoRA on q, k, v, o, gate, up, down) | parameters | f32 bytes |
/// |---|---|---|
/// | Llama-3.1-8B, r = 8 | 21.0 M | 84 MB |
/// | Llama-3-70B, r = 8 | 103.5 M | 414 MB |
/// | Llama-3.1-405B, r = 8 | 311.7 M | 1.25 GB |
/// | Llama-3-70B, r = 32 | 414.2 M | 1.66 GB |
///
/// (per layer and module r·(in + out) values; 70B: 80 layers, hidden 8,192,
/// FFN 28,672, 8 KV heads × 128; 405B: 126 layers, hidden 16,384, FFN 53,248.)
/// So [`ReadLimits::DEFAULT_MAX_BYTES`] = 2 GiB admits every rank-8 f32 adapter
/// of the largest open LLaMA and rank 32 on 70B, while a wrong path (a base
/// model, `/dev/zero`, a growing log) fails fast instead of allocating up to
/// the old 16 GiB. Raise it with `ReadLimits { max_bytes, ..Default::default() }`
/// for high-rank adapters of very large models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest accepted input (file or buffer), in bytes. Default
    /// [`ReadLimits::DEFAULT_MAX_BYTES`] (2 GiB).
    pub max_bytes: u64,
    /// Largest accepted JSON header, in bytes. Default 16 MiB: an adapter of
    /// 10,000 tensors needs well under 2 MiB.
    pub max_header_bytes: u64,
}

impl ReadLimits {
    /// Default [`ReadLimits::max_bytes`]: 2 GiB (see the table above).
    pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;
    /// Default [`ReadLimits::max_header_bytes`]: 16 MiB.
    pub const DEFAULT_MAX_HEADER_BYTES: u64 = 16 << 20;
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_header_bytes: Self::DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

struct ViewEntry<'data> {
    raw: String,
    key: LoraKey,
    dtype: Dtype,
    shape: [usize; 2],
    bytes: &'data [u8],
}

/// A zero-copy, validated view of a LoRA adapter in safetensors bytes.
///
/// Parsing validates the whole file (structure, dtypes, shapes, key names) but
/// converts nothing; [`TensorSource::copy_into`] converts one tensor into the
/// caller's buffer. Use it to compute probe features straight from a client's
/// upload without materialising the adapter.
///
/// ```
/// use safe_fedllm::lora::{AdapterView, LoraAdapter, LoraTensor, StorageDtype, TensorSource};
///
/// let mut adapter = LoraAdapter::new();
/// adapter.insert("model.layers.0.q_proj.lora_B.weight", LoraTensor::new("b", [2, 1], vec![1.5, -2.0])?)?;
/// let bytes = adapter.to_bytes(StorageDtype::Bf16)?;
///
/// let view = AdapterView::parse(&bytes)?;
/// let mut out = [0.0f32; 2];
/// view.copy_into("model.layers.0.q_proj.lora_B.weight", &mut out)?;
/// assert_eq!(out, [1.5, -2.0]);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub struct AdapterView<'data> {
    entries: BTreeMap<String, ViewEntry<'data>>,
    extras: BTreeMap<String, ExtraView<'data>>,
    config: LoraConfig,
    adapter_name: Option<String>,
}

struct ExtraView<'data> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'data [u8],
}

impl<'data> AdapterView<'data> {
    /// Parses and validates with the default [`ReadLimits`].
    pub fn parse(bytes: &'data [u8]) -> Result<Self> {
        Self::parse_with(bytes, &ReadLimits::default())
    }

    /// Parses and validates with explicit limits.
    pub fn parse_with(bytes: &'data [u8], limits: &ReadLimits) -> Result<Self> {
        check_input_size(bytes, limits)?;
        check_header_size(bytes, limits)?;
        let (header_len, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(Error::malformed)?;
        // `read_metadata` checked that the ranges tile bytes[8 + header_len..]
        // exactly; `get` keeps the slicing panic-free regardless.
        let data = header_len
            .checked_add(8)
            .and_then(|start| bytes.get(start..))
            .ok_or(Error::Malformed(MalformedSafetensors::InvalidHeaderLength))?;
        let metadata = header
            .metadata()
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let mut view = AdapterView {
            entries: BTreeMap::new(),
            extras: BTreeMap::new(),
            config: LoraConfig::from_metadata(metadata)?,
            adapter_name: None,
        };
        // Sorted by name, so errors (duplicate canonical keys, mixed adapters)
        // name the same tensors whatever the header's order.
        let mut tensors: Vec<(String, &safetensors::tensor::TensorInfo)> =
            header.tensors().into_iter().collect();
        tensors.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in tensors {
            let (start, end) = info.data_offsets;
            let bytes = data.get(start..end).ok_or(Error::Malformed(
                MalformedSafetensors::MetadataIncompleteBuffer,
            ))?;
            view.add(name, info.dtype, info.shape.clone(), bytes)?;
        }
        check_ranks(view.entries.values().map(|e| (&e.key, e.shape)))?;
        Ok(view)
    }

    /// Files one tensor as a LoRA matrix or an extra tensor.
    fn add(
        &mut self,
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: &'data [u8],
    ) -> Result<()> {
        let Some(key) = LoraKey::parse(&name) else {
            let extra = ExtraView {
                dtype,
                shape,
                bytes,
            };
            self.extras.insert(name, extra);
            return Ok(());
        };
        note_adapter_name(&mut self.adapter_name, key.adapter_name())?;
        let view_entry = view_entry(name, key, dtype, &shape, bytes)?;
        let canonical = view_entry.key.canonical().to_owned();
        if let Some(first) = self.entries.get(&canonical) {
            return Err(Error::DuplicateKey {
                canonical,
                first: first.raw.clone(),
                second: view_entry.raw,
            });
        }
        self.entries.insert(canonical, view_entry);
        Ok(())
    }

    /// The LoRA hyper-parameters recorded in the file's `__metadata__`.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapter name found in the keys, if any.
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter_name.as_deref()
    }

    /// Number of LoRA matrices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file holds no LoRA matrix.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Converts everything into an owned [`LoraAdapter`].
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        let mut adapter = LoraAdapter::new();
        for (canonical, entry) in &self.entries {
            let mut values = vec![0.0f32; entry.shape[0] * entry.shape[1]];
            decode_into(canonical, entry.dtype, entry.bytes, &mut values)?;
            let tensor = LoraTensor::new(canonical, entry.shape, values)?;
            adapter.insert_parsed(entry.key.clone(), tensor);
        }
        for (name, extra) in &self.extras {
            let tensor = ExtraTensor {
                dtype: extra.dtype,
                shape: extra.shape.clone(),
                bytes: extra.bytes.to_vec(),
            };
            adapter.extras.insert(name.clone(), tensor);
        }
        adapter.config = self.config.clone();
        adapter.adapter_name = self.adapter_name.clone();
        Ok(adapter)
    }
}

impl TensorSource for AdapterView<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        Box::new(self.entries.values().map(|e| &e.key))
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.entries.get(canonical).map(|e| e.shape)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        let range = checked_range(self, canonical, offset, out.len())?;
        let entry = self
            .entries
            .get(canonical)
            .ok_or_else(|| Error::MissingKey {
                tensor: canonical.to_owned(),
                present_in: "the requested keys",
                missing_from: "the viewed file",
            })?;
        let width = dtype_width(canonical, entry.dtype)?;
        // The header check guarantees bytes.len() == elements × width, and
        // `range` lies inside the elements, so the byte range is in bounds.
        let bytes = entry
            .bytes
            .get(range.start * width..range.end * width)
            .ok_or_else(|| Error::DataLength {
                tensor: canonical.to_owned(),
                shape: entry.shape.to_vec(),
                expected: entry.bytes.len() / width,
                found: range.end,
            })?;
        decode_into(canonical, entry.dtype, bytes, out)
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        // Zero-copy only when the bytes are f32, aligned and the host is
        // little-endian; otherwise readers convert ranges.
        let entry = self.entries.get(canonical)?;
        if entry.dtype != Dtype::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(entry.bytes).ok()
    }
}

fn check_input_size(bytes: &[u8], limits: &ReadLimits) -> Result<()> {
    let len = bytes.len() as u64;
    if len > limits.max_bytes {
        return Err(Error::InputTooLarge {
            found: len,
            limit: limits.max_bytes,
        });
    }
    Ok(())
}

/// The declared header length against [`ReadLimits::max_header_bytes`],
/// before the `safetensors` crate allocates anything for it.
fn check_header_size(bytes: &[u8], limits: &ReadLimits) -> Result<()> {
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(Error::Malformed(MalformedSafetensors::HeaderTooSmall));
    };
    let declared = u64::from_le_bytes(*prefix);
    if declared > limits.max_header_bytes {
        return Err(Error::HeaderTooLarge {
            declared,
            limit: limits.max_header_bytes,
        });
    }
    Ok(())
}

fn note_adapter_name(seen: &mut Option<String>, found: Option<&str>) -> Result<()> {
    let Some(found) = found else { return Ok(()) };
    match seen {
        Some(first) if first != found => Err(Error::MixedAdapters {
            first: first.clone(),
            second: found.to_owned(),
        }),
        Some(_) => Ok(()),
        None => {
            *seen = Some(found.to_owned());
            Ok(())
        }
    }
}

fn view_entry<'data>(
    raw: String,
    key: LoraKey,
    dtype: Dtype,
    shape: &[usize],
    bytes: &'data [u8],
) -> Result<ViewEntry<'data>> {
    let shape: [usize; 2] = match shape {
        &[rows, cols] => [rows, cols],
        other => {
            return Err(Error::NotAMatrix {
                tensor: raw,
                shape: other.to_vec(),
            });
        }
    };
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::UnsupportedDtype {
            tensor: raw,
            dtype: dtype.to_string(),
            supported: "F32, F16 or BF16",
        });
    }
    Ok(ViewEntry {
        raw,
        key,
        dtype,
        shape,
        bytes,
    })
}

struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

impl LoraAdapter {
    /// Parses safetensors bytes (default [`ReadLimits`]).
    ///
    /// LoRA `A`/`B` tensors must be 2-D F32, F16 or BF16 and are converted to
    /// `f32`; every other tensor is kept byte-for-byte in
    /// [`LoraAdapter::extras`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes_with(bytes, &ReadLimits::default())
    }

    /// Parses safetensors bytes with explicit limits.
    pub fn from_bytes_with(bytes: &[u8], limits: &ReadLimits) -> Result<Self> {
        AdapterView::parse_with(bytes, limits)?.to_adapter()
    }

    /// Loads a `.safetensors` file (default [`ReadLimits`]). Errors about the
    /// content come wrapped in [`Error::InFile`] with the path.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, &ReadLimits::default())
    }

    /// Loads a `.safetensors` file with explicit limits.
    pub fn load_with(path: impl AsRef<Path>, limits: &ReadLimits) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path, limits)?;
        Self::from_bytes_with(&bytes, limits).map_err(|e| Error::in_file(path, e))
    }

    /// Serialises to safetensors bytes: LoRA tensors in `dtype` under their
    /// canonical names, extras unchanged, and the [`LoraConfig`] in
    /// `__metadata__` (with `"format": "pt"`, as PEFT writes).
    ///
    /// A finite value that `dtype` cannot hold (above 65,504 in magnitude for
    /// [`StorageDtype::F16`], above `bf16::MAX` after rounding for
    /// [`StorageDtype::Bf16`]) is [`Error::StorageOverflow`] naming the tensor
    /// and flat index, instead of a file holding ±∞.
    pub fn to_bytes(&self, dtype: StorageDtype) -> Result<Vec<u8>> {
        let mut owned: Vec<(String, OwnedView)> =
            Vec::with_capacity(self.len() + self.extras.len());
        for entry in self.iter() {
            let t = &entry.tensor;
            let name = entry.key.canonical();
            owned.push((
                name.to_owned(),
                OwnedView {
                    dtype: dtype.dtype(),
                    shape: t.shape().to_vec(),
                    bytes: encode(name, t.as_slice(), dtype)?,
                },
            ));
        }
        for (name, extra) in &self.extras {
            owned.push((
                name.clone(),
                OwnedView {
                    dtype: extra.dtype,
                    shape: extra.shape.clone(),
                    bytes: extra.bytes.clone(),
                },
            ));
        }
        let mut meta: HashMap<String, String> = self.config.to_metadata().into_iter().collect();
        meta.insert("format".to_owned(), "pt".to_owned());
        let views = owned.iter().map(|(n, v)| (n.as_str(), v));
        safetensors::serialize(views, Some(meta)).map_err(Error::malformed)
    }

    /// Writes a `.safetensors` file.
    pub fn save(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes(dtype)?;
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// Reads a whole file of outside data (adapter, probe, manifest, checkpoint)
/// within `limits.max_bytes`, promptly.
///
/// - The path must name a regular file: a FIFO, device (`/dev/zero`),
///   directory or socket is [`Error::NotAFile`] *before* opening, since
///   opening a FIFO blocks until a writer appears and a device can stream
///   without end. (A path swapped for a FIFO between the check and the open
///   can still block; the opened handle is checked again.)
/// - A file whose size is above the limit is [`Error::InputTooLarge`] before a
///   byte is read; at most `max_bytes + 1` bytes are ever read, so a file that
///   grows while being read fails with the same error instead of exhausting
///   memory.
///
/// Size errors come wrapped in [`Error::InFile`] with the path.
pub fn read_file(path: &Path, limits: &ReadLimits) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    check_regular(path, &std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::File::open(path).map_err(io)?;
    let metadata = file.metadata().map_err(io)?;
    check_regular(path, &metadata)?;
    let too_large = |found| {
        Error::in_file(
            path,
            Error::InputTooLarge {
                found,
                limit: limits.max_bytes,
            },
        )
    };
    let len = metadata.len();
    if len > limits.max_bytes {
        return Err(too_large(len));
    }
    // A capacity hint only (len ≤ max_bytes was checked): where u64 does not
    // fit usize, start empty and let read_to_end grow the buffer.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let read = bytes.len() as u64;
    if read > limits.max_bytes {
        return Err(too_large(read));
    }
    Ok(bytes)
}

/// [`Error::NotAFile`] unless `metadata` describes a regular file.
fn check_regular(path: &Path, metadata: &std::fs::Metadata) -> Result<()> {
    let kind = metadata.file_type();
    if kind.is_file() {
        return Ok(());
    }
    Err(Error::NotAFile {
        path: path.to_owned(),
        kind: file_kind(&kind),
    })
}

fn file_kind(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "FIFO";
        }
        if kind.is_socket() {
            return "socket";
        }
        if kind.is_char_device() {
            return "character device";
        }
        if kind.is_block_device() {
            return "block device";
        }
    }
    if kind.is_dir() {
        "directory"
    } else {
        "special file"
    }
}
