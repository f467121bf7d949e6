//! The crate's error type: one enum, grouped by layer, with three context
//! wrappers.
//!
//! # Why one enum
//!
//! The data path crosses every layer in one call: a defended round reads an
//! upload, checks it against the global adapter, extracts features, scores
//! them with a probe, updates a detector and aggregates. Per-layer enums would
//! make the caller who most needs to act on a failure (the server running the
//! round) match two levels deep, and each layer would need its own copy of the
//! "which file, which client" context. So there is one [`Error`]; its variants
//! are grouped below by the layer that raises them, and each names *what* went
//! wrong with typed fields (tensor key, shapes, values, parameter).
//!
//! *Where* is added by three wrappers instead of being repeated in every
//! variant: [`Error::InFile`] (the file a content error came from),
//! [`Error::Client`] (the client whose message it was) and
//! [`Error::ManifestSample`] (the manifest line and sample file).
//! [`Error::root`] looks through them to the failure itself, and
//! [`Error::client`] finds the culprit client wherever it is recorded.
//!
//! # What is not an input error
//!
//! Nothing in this crate panics on input. A broken internal invariant (a bug
//! in this crate, never the caller's or a client's fault) is reported as
//! [`Error::Invariant`], naming the invariant, instead of a panic (a server
//! must not die on it) or a fallback value (a security crate must not guess).
//!
//! ```
//! use safe_fedllm::{ClientId, Error};
//!
//! let err = Error::Client {
//!     client: ClientId::from("node-7"),
//!     source: Box::new(Error::NonFinite { tensor: "w.lora_A.weight".into(), index: 3, value: f32::NAN }),
//! };
//! assert_eq!(err.client(), Some(&ClientId::from("node-7")));
//! assert!(matches!(err.root(), Error::NonFinite { index: 3, .. }));
//! ```

use std::path::PathBuf;

use crate::client::ClientId;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `safe_fedllm`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- Files and bytes (`lora::io`, probe files, CLI) -----
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Writing to a caller-supplied writer (an audit log) failed.
    #[error("writing the {what} failed: {source}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A path given as input is not a regular file (a FIFO, a device such as
    /// `/dev/zero`, a directory or a socket). Refused before opening, since
    /// opening a FIFO blocks and a device can stream without end.
    #[error("{path} is not a regular file (it is a {kind}); give the path of a file")]
    NotAFile {
        /// The path given.
        path: PathBuf,
        /// What it is instead: "directory", "FIFO", "socket", "character device", ….
        kind: &'static str,
    },

    /// The input is larger than the configured limit (checked before parsing).
    #[error("input of {found} bytes exceeds the limit of {limit} bytes")]
    InputTooLarge {
        /// Size of the input in bytes.
        found: u64,
        /// The configured limit.
        limit: u64,
    },

    /// The safetensors header declares a length above the configured limit
    /// (checked before the header is parsed, so no large allocation happens).
    #[error("the safetensors header declares {declared} bytes, above the limit of {limit}")]
    HeaderTooLarge {
        /// Header length declared in the first 8 bytes.
        declared: u64,
        /// The configured limit.
        limit: u64,
    },

    /// The bytes are not a valid safetensors file (truncated, bad JSON,
    /// overlapping offsets, trailing bytes, ...).
    #[error("malformed safetensors data: {0}")]
    Malformed(MalformedSafetensors),

    /// Metadata (safetensors `__metadata__`, a PEFT `adapter_config.json`, a
    /// probe file's header or a feature layout) holds a value that cannot be
    /// interpreted.
    #[error("metadata field `{field}` has the invalid value `{value}`: {reason}")]
    InvalidMetadata {
        /// Metadata field.
        field: String,
        /// The raw value (truncated when long).
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A record could not be serialised (a JSON audit line, a checkpoint).
    #[error("serialising the {what} failed: {reason}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The serialiser's message.
        reason: String,
    },

    /// A tensor is stored in a dtype this crate does not read there.
    #[error("tensor `{tensor}` has dtype {dtype}; expected {supported}")]
    UnsupportedDtype {
        /// Tensor key.
        tensor: String,
        /// The dtype found, as safetensors (or burn, candle) names it.
        dtype: String,
        /// The dtypes read at that place (`"F32, F16 or BF16"` for LoRA
        /// tensors, `"F32"` in a probe file).
        supported: &'static str,
    },

    // ----- Adapters, deltas and tensor sources (`lora`) -----
    /// A name passed where a LoRA `A`/`B` matrix name is required is not one.
    #[error("`{key}` is not a LoRA A/B tensor name")]
    NotALoraKey {
        /// The name given.
        key: String,
    },

    /// Two keys in one file name the same LoRA tensor (for example
    /// `…lora_A.weight` and `…lora_A.default.weight`).
    #[error("keys `{first}` and `{second}` both name the LoRA tensor `{canonical}`")]
    DuplicateKey {
        /// Canonical key both normalise to.
        canonical: String,
        /// First raw key.
        first: String,
        /// Second raw key.
        second: String,
    },

    /// One file mixes tensors of different named adapters.
    #[error("the file mixes adapters `{first}` and `{second}`; load one adapter at a time")]
    MixedAdapters {
        /// One adapter name.
        first: String,
        /// Another adapter name.
        second: String,
    },

    /// A LoRA tensor is not a matrix.
    #[error("LoRA tensor `{tensor}` must be 2-D, found shape {shape:?}")]
    NotAMatrix {
        /// Tensor key.
        tensor: String,
        /// The shape found.
        shape: Vec<usize>,
    },

    /// A tensor's data length does not match its shape.
    #[error("tensor `{tensor}` has shape {shape:?} ({expected} values) but holds {found} values")]
    DataLength {
        /// Tensor key.
        tensor: String,
        /// The declared shape.
        shape: Vec<usize>,
        /// Element count implied by the shape.
        expected: usize,
        /// Element count found.
        found: usize,
    },

    /// `lora_A` and `lora_B` of one module disagree on the rank.
    #[error(
        "module `{module}`: lora_A has shape {a_shape:?} and lora_B {b_shape:?}, \
         so their ranks ({a_rank} and {b_rank}) disagree"
    )]
    RankMismatch {
        /// Module path (everything before `lora_A`/`lora_B`).
        module: String,
        /// Shape of `lora_A` (`[r, in]`).
        a_shape: [usize; 2],
        /// Shape of `lora_B` (`[out, r]`).
        b_shape: [usize; 2],
        /// Rank implied by `lora_A`.
        a_rank: usize,
        /// Rank implied by `lora_B`.
        b_rank: usize,
    },

    /// A tensor has a different shape than expected.
    #[error("tensor `{tensor}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Tensor key.
        tensor: String,
        /// Shape expected (from the global adapter or the frozen feature layout).
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },

    /// A tensor present on one side is missing on the other (a delta's two
    /// adapters, a client's upload and the global adapter, a probe's layout
    /// and a file).
    #[error("tensor `{tensor}` is in {present_in} but missing from {missing_from}")]
    MissingKey {
        /// Tensor key.
        tensor: String,
        /// The side that has it, as a noun phrase (`"the global adapter"`).
        present_in: &'static str,
        /// The side that lacks it, as a noun phrase (`"the client's update"`).
        missing_from: &'static str,
    },

    /// A non-finite value (NaN or ±∞) was found where finite numbers are required.
    #[error("tensor `{tensor}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// Tensor key (or what holds the value, such as `"probe score"`).
        tensor: String,
        /// Row-major flat index of the first offending value.
        index: usize,
        /// The offending value.
        value: f32,
    },

    /// A finite value does not fit the storage dtype it is being written in:
    /// it would round to ±∞ (f16 above 65,504, bf16 above ~3.39·10³⁸), and a
    /// file holding ∞ fails every later read as a global.
    #[error(
        "tensor `{tensor}` holds {value} at flat index {index}, which overflows {dtype} (it would be stored as ±inf)"
    )]
    StorageOverflow {
        /// Tensor key.
        tensor: String,
        /// Row-major flat index of the first offending value.
        index: usize,
        /// The finite value that does not fit.
        value: f32,
        /// The storage dtype (`"F16"` or `"BF16"`).
        dtype: &'static str,
    },

    // ----- Features, probes and their training (`features`, `probe`) -----
    /// A feature selection picked no tensor at all.
    #[error("feature selection {selection} matched no LoRA tensor in the training deltas")]
    EmptySelection {
        /// The selection, as text.
        selection: String,
    },

    /// A feature vector or matrix has the wrong width.
    #[error("{what}: expected {expected} features, found {found}")]
    DimensionMismatch {
        /// What was being checked.
        what: String,
        /// Expected width.
        expected: usize,
        /// Width found.
        found: usize,
    },

    /// A feature matrix or vector handed to a probe holds NaN or ±∞.
    #[error("{what}: non-finite value {value} at row {row}, column {column}")]
    NonFiniteFeature {
        /// Which input (e.g. `"training features"`).
        what: &'static str,
        /// Row (sample) index.
        row: usize,
        /// Column (feature) index.
        column: usize,
        /// The offending value.
        value: f32,
    },

    /// A training set lacks one of the two classes.
    #[error("the training set of {samples} samples has no {missing} sample")]
    MissingClass {
        /// The class with no sample (`"benign"` or `"malicious"`).
        missing: &'static str,
        /// Number of samples in the set.
        samples: usize,
    },

    /// An optimiser produced a non-finite loss or gradient.
    #[error("{solver} diverged at iteration {iteration}: {detail}")]
    NumericalFailure {
        /// The solver.
        solver: &'static str,
        /// Iteration at which it happened.
        iteration: usize,
        /// What was non-finite.
        detail: String,
    },

    /// An external trainer (linfa) failed.
    #[error("trainer {trainer} failed: {reason}")]
    TrainerFailed {
        /// Trainer name.
        trainer: &'static str,
        /// The trainer's own error message.
        reason: String,
    },

    /// Cross-validated calibration of a probe could not be done (for example
    /// the out-of-fold scores are not positively associated with the
    /// malicious label, so no increasing map turns them into probabilities).
    #[error("probe calibration failed: {detail}")]
    CalibrationFailed {
        /// What went wrong, with the figures involved.
        detail: String,
    },

    /// A line of a JSON-lines dataset manifest was rejected.
    #[error("manifest line {line}: {reason}")]
    Manifest {
        /// 1-based line number.
        line: usize,
        /// Why it was rejected.
        reason: String,
    },

    // ----- Parameters and caller inputs (every layer) -----
    /// A setting of a trainer, detector, admission policy, round or
    /// aggregation rule is outside its valid range (checked when the
    /// component is built or configured, never deep in the maths).
    #[error("{component}: parameter `{name}` = {value} is invalid: expected {expected}")]
    InvalidParameter {
        /// The component (`"krum"`, `"client level"`, `"logistic trainer"`, …).
        component: &'static str,
        /// Parameter name, as the builder method spells it.
        name: &'static str,
        /// The value given, as text.
        value: String,
        /// The valid range.
        expected: &'static str,
    },

    /// A defense spec (JSON or TOML) could not be used: an unknown or
    /// misspelt key, a value of the wrong type, or a setting out of range.
    #[error("defense spec, key `{key}`: {reason}{}", did_you_mean(.suggestion))]
    Spec {
        /// Dotted path of the offending key (`detector.steepness`), or the
        /// section when the whole section is at fault.
        key: String,
        /// What is wrong with it.
        reason: String,
        /// The known key closest to a misspelt one.
        suggestion: Option<String>,
    },

    /// A collection that must not be empty was empty.
    #[error("{what} must not be empty")]
    Empty {
        /// What was empty.
        what: &'static str,
    },

    /// Two collections that must pair up one to one have different lengths.
    #[error("{what}: expected {expected} entries, found {found}")]
    LengthMismatch {
        /// What was being paired (e.g. `"labels for feature rows"`).
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length found.
        found: usize,
    },

    /// A size computed from the input does not fit the machine's integers
    /// (for example a total element count above `usize::MAX`).
    #[error("{what} overflows: {detail}")]
    Overflow {
        /// What was being computed.
        what: &'static str,
        /// The figures involved.
        detail: String,
    },

    // ----- Clients, detectors and rounds (`detect`, `round`, `aggregate`) -----
    /// A client's detector evidence cannot be used (for example a NaN score).
    #[error("client `{client}`, round {round}: invalid evidence: {reason}")]
    InvalidEvidence {
        /// The client the evidence belongs to.
        client: ClientId,
        /// Round number (0-based).
        round: u32,
        /// What was wrong.
        reason: String,
    },

    /// A client's security factor is NaN or outside [0, 1].
    #[error("client `{client}`: security factor {value} is not in [0, 1]")]
    InvalidSecurityFactor {
        /// The client.
        client: ClientId,
        /// The factor given.
        value: f64,
    },

    /// Two updates in one round claim the same client id.
    #[error("client `{client}` sent more than one update in this round")]
    DuplicateClient {
        /// The repeated id.
        client: ClientId,
    },

    /// A round has too few usable clients for a rule's robustness guarantee
    /// (for example Krum's n ≥ 2f + 3).
    #[error(
        "aggregator {rule} needs {constraint} (at least {required} usable clients), found {found}"
    )]
    TooFewClients {
        /// The rule.
        rule: &'static str,
        /// The constraint, as a formula with its parameters filled in.
        constraint: String,
        /// Minimum number of usable clients.
        required: usize,
        /// Usable clients in the round (after exclusions).
        found: usize,
    },

    /// Detector state restored from a checkpoint is inconsistent.
    #[error("the checkpoint holds an invalid {what}: {value}")]
    InvalidCheckpoint {
        /// Which part of the state.
        what: &'static str,
        /// The offending value.
        value: String,
    },

    /// The benign updates given to an attack helper do not line up.
    #[error("benign update {index}: tensor `{tensor}` {reason}")]
    AttackInput {
        /// Position of the offending update in the slice.
        index: usize,
        /// The tensor key.
        tensor: String,
        /// What differs.
        reason: &'static str,
    },

    // ----- Other libraries' tensors (`interop`, features `burn`/`candle`) -----
    /// A tensor of another library (burn, candle) has a name the interop name
    /// map does not translate to a PEFT LoRA key (a renamed or extra tensor).
    #[error("{library} tensor `{tensor}` has no PEFT LoRA name under the {map} name map")]
    UnmappedTensor {
        /// The library (`"burn"` or `"candle"`).
        library: &'static str,
        /// The tensor's name in that library (burn record path, candle map key).
        tensor: String,
        /// The name map used (`"llama"`, `"table"`, a custom label).
        map: String,
    },

    /// Another library (burn, candle) failed to read, convert or write a tensor.
    #[error("{library} tensor `{tensor}`: {reason}")]
    InteropFailed {
        /// The library (`"burn"` or `"candle"`).
        library: &'static str,
        /// The tensor's name (PEFT key when known, else the library's name).
        tensor: String,
        /// The library's own message.
        reason: String,
    },

    // ----- Context wrappers: where a failure happened -----
    /// A file could be read but its content was rejected.
    #[error("in {path}: {source}")]
    InFile {
        /// The file involved.
        path: PathBuf,
        /// What was wrong with its content.
        #[source]
        source: Box<Error>,
    },

    /// A client's message was rejected or could not be read (a key or shape
    /// that differs from the global adapter, a source whose values contradict
    /// its own shape, ...).
    #[error("client `{client}`: {source}")]
    Client {
        /// The client whose message it was.
        client: ClientId,
        /// What was wrong with it.
        #[source]
        source: Box<Error>,
    },

    /// A sample of a manifest could not be read or used. Relative paths in a
    /// manifest are resolved against the manifest's own folder, not the
    /// working directory; the message says which folder.
    #[error(
        "manifest line {line}: sample `{path}` (relative paths in a manifest resolve against its folder `{root}`): {source}"
    )]
    ManifestSample {
        /// 1-based line number.
        line: usize,
        /// The resolved path of the file that failed.
        path: PathBuf,
        /// The folder relative paths were resolved against.
        root: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },

    // ----- Not the input's fault -----
    /// An internal invariant of this crate does not hold. This is a bug in
    /// `safe_fedllm`, never a fault of the input: it is reported as an error
    /// rather than a panic (a server must not die on it) and rather than a
    /// fallback value (a security crate must not guess a zero).
    #[error(
        "internal invariant broken in {location}: {invariant} ({detail}); \
         this is a bug in safe_fedllm, please report it"
    )]
    Invariant {
        /// Where (module and function).
        location: &'static str,
        /// The invariant that should have held, stated as a fact.
        invariant: &'static str,
        /// The values that broke it.
        detail: String,
    },
}

/// What is wrong with bytes that are not a valid safetensors file.
///
/// The checks are the `safetensors` crate's own (the parser every PyTorch and
/// PEFT loader uses, so the server and the ecosystem read a file the same
/// way); its error enum is mapped here so that no foreign error type is part
/// of this crate's API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedSafetensors {
    /// Fewer than the 8 bytes of the header-length prefix.
    #[error("fewer than 8 bytes: no header-length prefix")]
    HeaderTooSmall,
    /// The declared header length runs past the end of the input.
    #[error("the declared header length runs past the end of the input")]
    InvalidHeaderLength,
    /// The declared header is above the `safetensors` crate's own 100 MB cap
    /// (the tighter [`crate::lora::ReadLimits::max_header_bytes`] is checked first).
    #[error("the declared header is above the safetensors format's 100 MB cap")]
    HeaderTooLarge,
    /// The header is not UTF-8.
    #[error("the header is not UTF-8 (valid up to byte {valid_up_to})")]
    InvalidHeader {
        /// Bytes of the header that are valid UTF-8.
        valid_up_to: usize,
    },
    /// The header is not the expected JSON object.
    #[error("the header is not a valid safetensors JSON object: {detail}")]
    InvalidHeaderDeserialization {
        /// The JSON parser's message (with line and column).
        detail: String,
    },
    /// A tensor's byte range does not start where the previous one ends
    /// (a gap, an overlap, or a reversed range).
    #[error("tensor `{tensor}`: its data offsets leave a gap or overlap")]
    InvalidOffset {
        /// The tensor whose range is wrong.
        tensor: String,
    },
    /// A tensor's byte range disagrees with its shape and dtype.
    #[error("a tensor's byte range disagrees with its shape and dtype")]
    TensorInvalidInfo,
    /// The tensors' byte ranges do not cover the data section exactly
    /// (missing or trailing bytes).
    #[error("the tensors' byte ranges do not cover the data section exactly")]
    MetadataIncompleteBuffer,
    /// A shape's element count or byte size overflows.
    #[error("a tensor's element count or byte size overflows")]
    ValidationOverflow,
    /// A sub-byte dtype's size is not a whole number of bytes.
    #[error("a tensor of a sub-byte dtype does not fill whole bytes")]
    MisalignedSlice,
    /// Any other failure the `safetensors` crate reports.
    #[error("{detail}")]
    Other {
        /// The `safetensors` crate's message.
        detail: String,
    },
}

impl MalformedSafetensors {
    /// Maps the `safetensors` crate's error (kept crate-private so the foreign
    /// type stays out of the API).
    pub(crate) fn from_safetensors(err: safetensors::SafeTensorError) -> Self {
        use safetensors::SafeTensorError as E;
        match err {
            E::HeaderTooSmall => Self::HeaderTooSmall,
            E::InvalidHeaderLength => Self::InvalidHeaderLength,
            E::HeaderTooLarge => Self::HeaderTooLarge,
            E::InvalidHeader(e) => Self::InvalidHeader {
                valid_up_to: e.valid_up_to(),
            },
            E::InvalidHeaderDeserialization(e) | E::JsonError(e) => {
                Self::InvalidHeaderDeserialization {
                    detail: e.to_string(),
                }
            }
            E::InvalidOffset(tensor) => Self::InvalidOffset { tensor },
            E::TensorInvalidInfo => Self::TensorInvalidInfo,
            E::MetadataIncompleteBuffer => Self::MetadataIncompleteBuffer,
            E::ValidationOverflow => Self::ValidationOverflow,
            E::MisalignedSlice => Self::MisalignedSlice,
            other => Self::Other {
                detail: other.to_string(),
            },
        }
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

impl Error {
    /// [`Error::Malformed`] from the `safetensors` crate's error.
    pub(crate) fn malformed(err: safetensors::SafeTensorError) -> Self {
        Error::Malformed(MalformedSafetensors::from_safetensors(err))
    }

    /// [`Error::Invariant`]: an internal invariant did not hold.
    pub(crate) fn invariant(
        location: &'static str,
        invariant: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Error::Invariant {
            location,
            invariant,
            detail: detail.into(),
        }
    }

    /// [`Error::InvalidParameter`] for `component`'s parameter `name`.
    pub(crate) fn parameter(
        component: &'static str,
        name: &'static str,
        value: impl std::fmt::Display,
        expected: &'static str,
    ) -> Self {
        Error::InvalidParameter {
            component,
            name,
            value: value.to_string(),
            expected,
        }
    }

    /// Wraps a content error with the path of the file it came from.
    pub(crate) fn in_file(path: impl Into<PathBuf>, source: Error) -> Self {
        Error::InFile {
            path: path.into(),
            source: Box::new(source),
        }
    }

    /// Wraps an error with the client whose message caused it.
    pub(crate) fn for_client(client: impl Into<ClientId>, source: Error) -> Self {
        Error::Client {
            client: client.into(),
            source: Box::new(source),
        }
    }

    /// The innermost error, looking through the context wrappers
    /// ([`Error::InFile`], [`Error::Client`], [`Error::ManifestSample`]).
    ///
    /// Handy for matching on the variant without caring which file or client
    /// it came from.
    pub fn root(&self) -> &Error {
        match self {
            Error::InFile { source, .. }
            | Error::Client { source, .. }
            | Error::ManifestSample { source, .. } => source.root(),
            other => other,
        }
    }

    /// The client the failure is attributed to, if any: the outermost
    /// [`Error::Client`] wrapper, else a variant's own `client` field.
    ///
    /// A server uses it to act on the culprit (exclude, log, rate-limit)
    /// without matching every variant.
    pub fn client(&self) -> Option<&ClientId> {
        match self {
            Error::Client { client, .. }
            | Error::InvalidEvidence { client, .. }
            | Error::InvalidSecurityFactor { client, .. }
            | Error::DuplicateClient { client } => Some(client),
            Error::InFile { source, .. } | Error::ManifestSample { source, .. } => source.client(),
            _ => None,
        }
    }

    /// Whether this is a bug in this crate ([`Error::Invariant`]) rather than
    /// a fault of the input, looking through the context wrappers.
    pub fn is_internal(&self) -> bool {
        matches!(self.root(), Error::Invariant { .. })
    }
}

/// `Ok(())` when `ok`, else [`Error::parameter`]: the one check every
/// params type's validation is written with.
pub(crate) fn check_parameter(
    ok: bool,
    component: &'static str,
    name: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::parameter(component, name, value, expected))
    }
}

/// `Ok(())` when `found == expected`, else [`Error::LengthMismatch`]
/// naming what was being paired.
pub(crate) fn check_length(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            found,
        })
    }
}
