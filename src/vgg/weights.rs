//! Reading VGG `features` weights from safetensors (docs/design.md,
//! "Weights").
//!
//! Names are torchvision's (`features.N.weight`, `features.N.bias`),
//! optionally behind a `vgg16.`, `vgg19.` or `model.` prefix. Tensors may be
//! f32, f16 or bf16; they are converted to f32 here. Other tensors (the
//! classifier, say) are ignored.
//!
//! The 8-byte header length and the JSON header are read and checked
//! against the file's size first; then only the tensors the network needs
//! are read, each from its own byte range, so a file's size or content
//! costs nothing before it is known to be right. Every problem is an error
//! naming the tensor and its layer, and the same file always gives the
//! same message: tensors are checked in layer order, and a name given
//! twice in the header is itself an error.

use super::arch::{Layer, Module, VggArch};
use crate::error::{Error, Result};
use crate::fallible;
use half::{bf16, f16};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// One convolution's parameters in f32: weight [out][in][3][3], bias [out].
#[derive(Debug, Clone)]
pub(crate) struct ConvWeights {
    pub in_c: usize,
    pub out_c: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// The filters as the CPU's products take them, each made on first use
    /// (`cpu::layers::Prepared` names them).
    pub prepared: [std::sync::OnceLock<Vec<f32>>; 6],
}

/// Every convolution's parameters in f32, by layer index, and the CPU
/// passes' buffers kept between calls.
#[derive(Debug, Clone)]
pub(crate) struct HostWeights {
    by_layer: Vec<Option<ConvWeights>>,
    pub buffers: crate::ops::perceptual::cpu::buffers::Buffers,
}

impl HostWeights {
    /// The parameters of convolution layer `layer`.
    pub(crate) fn conv(&self, layer: usize) -> Result<&ConvWeights> {
        self.by_layer
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Internal(format!("layer {layer} has no convolution weights")))
    }

    /// (layer, parameters) of every convolution, in order.
    pub(crate) fn convs(&self) -> impl Iterator<Item = (usize, &ConvWeights)> {
        self.by_layer
            .iter()
            .enumerate()
            .filter_map(|(layer, c)| Some((layer, c.as_ref()?)))
    }
}

const PREFIXES: [&str; 4] = ["", "vgg16.", "vgg19.", "model."];

/// The largest header accepted. A VGG header is a few KB and one of
/// thousands of tensors well under a megabyte; the format itself allows
/// 100 MB, but parsing that much JSON can take a gigabyte or more, and
/// no weights file of this crate comes near it.
const MAX_HEADER: u64 = 16 << 20;

fn bad(msg: String) -> Error {
    Error::InvalidWeights(msg)
}

/// The bytes of a safetensors image: a file read by ranges, or a buffer.
pub(crate) enum Source<'a> {
    File {
        file: std::fs::File,
        len: u64,
        path: &'a Path,
    },
    Bytes(&'a [u8]),
}

impl<'a> Source<'a> {
    /// The source of a load.
    pub(crate) fn of(source: super::WeightsSource<'a>) -> Result<Self> {
        match source {
            super::WeightsSource::Bytes(b) => Ok(Source::Bytes(b)),
            super::WeightsSource::Path(p) => Source::open(p),
        }
    }

    /// Opens `path`, which must be a regular file: a directory, FIFO,
    /// socket or device is refused before it is opened (opening a FIFO
    /// would block; reading a device might never end).
    pub(crate) fn open(path: &'a Path) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io(format!("reading weights {}: {e}", path.display()));
        let kind = std::fs::metadata(path).map_err(io)?.file_type();
        if !kind.is_file() {
            return Err(Error::Io(format!(
                "weights {} is {}, not a regular file",
                path.display(),
                describe(kind)
            )));
        }
        // Non-blocking, so that a FIFO put in the file's place after the
        // check above opens at once and is refused below (regular files
        // read the same either way).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        // The file opened may have replaced the one looked at.
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(Error::Io(format!(
                "weights {} is not a regular file",
                path.display()
            )));
        }
        Ok(Source::File {
            file,
            len: meta.len(),
            path,
        })
    }

    fn len(&self) -> u64 {
        match self {
            Source::File { len, .. } => *len,
            Source::Bytes(b) => b.len() as u64,
        }
    }

    /// `len` bytes from `offset` (within the length, checked before).
    fn read_at(&mut self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut buf = fallible::filled(len, 0u8, what)?;
        match self {
            Source::Bytes(b) => buf.copy_from_slice(&b[offset as usize..][..len]),
            Source::File { file, path, .. } => file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| Error::Io(format!("reading weights {}: {e}", path.display())))?,
        }
        Ok(buf)
    }
}

fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// The JSON header's entries in the order written, refusing a name given
/// twice (which one would be meant?).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Each;
        impl<'de> Visitor<'de> for Each {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensors")
            }
            fn visit_map<M: MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Entries, M::Error> {
                let mut seen = std::collections::BTreeSet::new();
                let mut entries = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, Value>()? {
                    if !seen.insert(name.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "the tensor {name:?} is named twice"
                        )));
                    }
                    entries.push((name, value));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Each)
    }
}

/// A tensor's entry in the header, checked against the file.
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    /// Byte range in the file.
    begin: u64,
    end: u64,
}

/// A safetensors header: where the data starts and each tensor's entry.
struct Header {
    data_start: u64,
    tensors: BTreeMap<String, Value>,
}

impl Header {
    /// Reads and checks the length and the JSON header of `source`.
    fn read(source: &mut Source<'_>) -> Result<Header> {
        let len = source.len();
        if len < 8 {
            return Err(bad(format!(
                "not a safetensors file: it has {len} bytes, fewer than the 8 of a header length"
            )));
        }
        let mut length = [0u8; 8];
        length.copy_from_slice(&source.read_at(0, 8, "a header length")?);
        let n = u64::from_le_bytes(length);
        if n > MAX_HEADER {
            return Err(bad(format!(
                "not a safetensors file: its header length is {n} bytes, more than the {MAX_HEADER} allowed"
            )));
        }
        if n > len - 8 {
            return Err(bad(format!(
                "not a safetensors file: its header length is {n} bytes, but only {} follow it",
                len - 8
            )));
        }
        let text = source.read_at(8, n as usize, "a weights header")?;
        let text = std::str::from_utf8(&text).map_err(|e| {
            bad(format!(
                "not a safetensors file: its header is not UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        })?;
        let entries: Entries = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not a safetensors file: its header is not valid: {e}"
            ))
        })?;
        let tensors = entries
            .0
            .into_iter()
            .filter(|(name, _)| name != "__metadata__")
            .collect();
        Ok(Header {
            data_start: 8 + n,
            tensors,
        })
    }

    /// The entry of tensor `name` (of `layer`), checked: a float dtype,
    /// shape `shape`, and a byte range of the right size inside the file.
    fn entry(&self, name: &str, layer: &Layer, shape: &[usize], file_len: u64) -> Result<Entry> {
        let at = |what: String| bad(format!("tensor {name} ({}) {what}", layer.name));
        let value = self
            .tensors
            .get(name)
            .ok_or_else(|| at("is missing".into()))?;
        let field = |key: &str| value.get(key).ok_or_else(|| at(format!("has no {key}")));
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| at("has a dtype that is not a string".into()))?
            .to_string();
        let numbers = |key: &str| -> Result<Vec<u64>> {
            let list = field(key)?
                .as_array()
                .ok_or_else(|| at(format!("has a {key} that is not a list")))?;
            list.iter()
                .map(|v| {
                    v.as_u64()
                        .ok_or_else(|| at(format!("has a {key} entry {v} that is not a size")))
                })
                .collect()
        };
        let got_shape = numbers("shape")?;
        if got_shape.len() != shape.len()
            || got_shape.iter().zip(shape).any(|(&a, &b)| a != b as u64)
        {
            return Err(at(format!("has shape {got_shape:?}, expected {shape:?}")));
        }
        let elem = match dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => return Err(at(format!("is {other}; expected F32, F16 or BF16"))),
        };
        let offsets = numbers("data_offsets")?;
        let [begin, end] = offsets[..] else {
            return Err(at(format!("has data_offsets {offsets:?}, not two offsets")));
        };
        let bytes = (shape.iter().product::<usize>() * elem) as u64;
        if end < begin || end - begin != bytes {
            return Err(at(format!(
                "has data_offsets [{begin}, {end}], but its shape {shape:?} of {dtype} takes {bytes} bytes"
            )));
        }
        let data_len = file_len - self.data_start;
        if end > data_len {
            return Err(at(format!(
                "has data_offsets [{begin}, {end}], past the end of the file's {data_len} bytes of data"
            )));
        }
        Ok(Entry {
            dtype,
            shape: shape.to_vec(),
            begin: self.data_start + begin,
            end: self.data_start + end,
        })
    }
}

impl Header {
    /// Errors unless every tensor of the file, read or not, has a byte
    /// range inside the data and no two share bytes: the format lays them
    /// out one after another, and sharing would hand one tensor's values
    /// to another. Costs only the header. Checked in name order.
    fn check_ranges(&self, file_len: u64) -> Result<()> {
        let data_len = file_len - self.data_start;
        let mut ranges = Vec::with_capacity(self.tensors.len());
        for (name, value) in &self.tensors {
            let offsets = value.get("data_offsets").and_then(Value::as_array);
            let pair = offsets.and_then(|o| match o[..] {
                [ref b, ref e] => Some((b.as_u64()?, e.as_u64()?)),
                _ => None,
            });
            match pair {
                Some((begin, end)) if begin <= end && end <= data_len => {
                    if end > begin {
                        ranges.push((begin, end, name.as_str()));
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "tensor {name} has data_offsets that are not two offsets within the file's {data_len} bytes of data"
                    )))
                }
            }
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            let ((_, end, first), (begin, _, second)) = (&pair[0], &pair[1]);
            if begin < end {
                return Err(bad(format!(
                    "tensor {second} overlaps the data of tensor {first}: the file is corrupt"
                )));
            }
        }
        Ok(())
    }
}

/// The prefix under which `features.0.weight` exists.
fn prefix(header: &Header, arch: VggArch) -> Result<&'static str> {
    PREFIXES
        .into_iter()
        .find(|p| header.tensors.contains_key(&format!("{p}features.0.weight")))
        .ok_or_else(|| {
            bad(format!(
                "no tensor features.0.weight (with an optional vgg16./vgg19./model. prefix) in a file of {} tensors; \
                 is this a torchvision {} state dict?",
                header.tensors.len(),
                arch.name()
            ))
        })
}

/// Errors unless every `features.K.*` tensor of the file names a
/// convolution of `arch`: a file of another architecture is refused, not
/// read as a prefix of this one. Checked in module order.
fn check_names(header: &Header, prefix: &str, arch: VggArch, layers: &[Layer]) -> Result<()> {
    let features = format!("{prefix}features.");
    let mut modules: Vec<(usize, &str)> = header
        .tensors
        .keys()
        .filter_map(|name| {
            let rest = name.strip_prefix(&features)?;
            let index = rest.split('.').next()?.parse().ok()?;
            Some((index, name.as_str()))
        })
        .collect();
    modules.sort();
    for (index, name) in modules {
        let conv = layers
            .get(index)
            .is_some_and(|l| matches!(l.module, Module::Conv { .. }));
        if !conv {
            let module = layers.get(index).map_or("no module".to_string(), |l| {
                format!("module {index} is {}", l.name)
            });
            return Err(bad(format!(
                "tensor {name}: {} has no convolution there ({module}); is this a file of another network?",
                arch.name()
            )));
        }
    }
    Ok(())
}

/// How many of `layers` a load takes: all of them when `whole`, else as
/// deep as the file's convolutions go: every layer before the first
/// convolution whose weight the file lacks. A file that lacks one but
/// holds a deeper one is not a prefix of the network, and is refused
/// rather than cut short.
fn depth_in(
    header: &Header,
    prefix: &str,
    arch: VggArch,
    layers: &[Layer],
    whole: bool,
) -> Result<usize> {
    let weight = |l: &Layer| format!("{prefix}features.{}.weight", l.index);
    let conv = |l: &&Layer| matches!(l.module, Module::Conv { .. });
    if whole {
        return Ok(layers.len());
    }
    let Some(gap) = layers
        .iter()
        .filter(conv)
        .find(|l| !header.tensors.contains_key(&weight(l)))
    else {
        return Ok(layers.len());
    };
    let all = arch.layers();
    if let Some(deeper) = all[gap.index..]
        .iter()
        .filter(conv)
        .find(|l| header.tensors.contains_key(&weight(l)))
    {
        return Err(bad(format!(
            "tensor {} ({}) is missing, but the deeper {} ({}) is there: the file has a gap, \
             not a prefix of the network",
            weight(gap),
            gap.name,
            weight(deeper),
            deeper.name
        )));
    }
    Ok(gap.index)
}

/// A convolution to load: its layer, (in, out) channels, and the entries
/// of its weight and bias.
type ConvEntries = (usize, (usize, usize), Entry, Entry);

/// The entries of every convolution to load, checked.
fn entries(
    header: &Header,
    prefix: &str,
    layers: &[Layer],
    file_len: u64,
) -> Result<Vec<ConvEntries>> {
    let mut out = Vec::new();
    for layer in layers {
        let Module::Conv { in_c, out_c } = layer.module else {
            continue;
        };
        let base = format!("{prefix}features.{}", layer.index);
        let weight = header.entry(
            &format!("{base}.weight"),
            layer,
            &[out_c, in_c, 3, 3],
            file_len,
        )?;
        let bias = header.entry(&format!("{base}.bias"), layer, &[out_c], file_len)?;
        out.push((layer.index, (in_c, out_c), weight, bias));
    }
    header.check_ranges(file_len)?;
    Ok(out)
}

/// How deep a load goes: all of the given layers, or as deep as the file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Depth {
    /// Every layer given; a missing tensor is an error.
    Whole,
    /// As deep as the file's convolutions go.
    AsFileGoes,
}

/// The number of `layers` a load from `source` takes (at least the first
/// convolution), checking every entry it would read, without reading any
/// tensor data.
pub(crate) fn depth(
    source: &mut Source<'_>,
    arch: VggArch,
    layers: &[Layer],
    depth: Depth,
) -> Result<usize> {
    let (header, prefix, count) = plan(source, arch, layers, depth)?;
    entries(&header, prefix, &layers[..count], source.len())?;
    Ok(count)
}

/// The header, the name prefix and how many layers a load takes.
fn plan(
    source: &mut Source<'_>,
    arch: VggArch,
    layers: &[Layer],
    depth: Depth,
) -> Result<(Header, &'static str, usize)> {
    let header = Header::read(source)?;
    let prefix = prefix(&header, arch)?;
    check_names(&header, prefix, arch, &arch.layers())?;
    let count = depth_in(&header, prefix, arch, layers, depth == Depth::Whole)?;
    Ok((header, prefix, count))
}

/// The conv weights of `layers` (or as many of them as the file holds,
/// with `Depth::AsFileGoes`), read from `source`, and how many layers
/// they cover.
pub(crate) fn read(
    source: &mut Source<'_>,
    arch: VggArch,
    layers: &[Layer],
    depth: Depth,
) -> Result<(HostWeights, usize)> {
    let (header, prefix, count) = plan(source, arch, layers, depth)?;
    let mut by_layer = Vec::new();
    for (index, (in_c, out_c), weight, bias) in
        entries(&header, prefix, &layers[..count], source.len())?
    {
        let layer = &layers[index];
        by_layer.resize_with(index + 1, || None);
        by_layer[index] = Some(ConvWeights {
            in_c,
            out_c,
            weight: values(source, &weight, layer, "weight")?,
            bias: values(source, &bias, layer, "bias")?,
            prepared: Default::default(),
        });
    }
    let buffers = Default::default();
    Ok((HostWeights { by_layer, buffers }, count))
}

/// A tensor's values in f32, all finite.
fn values(source: &mut Source<'_>, entry: &Entry, layer: &Layer, kind: &str) -> Result<Vec<f32>> {
    let name = format!("features.{}.{kind}", layer.index);
    let bytes = source.read_at(entry.begin, (entry.end - entry.begin) as usize, &name)?;
    let count = entry.shape.iter().product::<usize>();
    let mut values = fallible::with_capacity(count, &name)?;
    match entry.dtype.as_str() {
        "F32" => values.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        "F16" => values.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => values.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "tensor {name} ({}) has a non-finite value ({}) at element {i}",
            layer.name, values[i]
        )));
    }
    Ok(values)
}
