//! Element types the codecs accept, and the trait that lets kernels be generic over them.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element type of a tensor. The discriminant is the on-disk code (docs/FORMAT.md), shared by the
/// packed tensor and the checkpoint container. Codecs accept the four [`DType::PACKABLE`] float
/// types; a checkpoint entry may have any of [`DType::STORABLE`] (the others are stored raw or as
/// zstd of their bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    F64 = 4,
    Bool = 10,
    U8 = 11,
    I8 = 12,
    I16 = 13,
    I32 = 14,
    I64 = 15,
    U16 = 16,
    U32 = 17,
    U64 = 18,
    C64 = 20,
    C128 = 21,
    F8E4M3 = 22,
    F8E5M2 = 23,
}

impl DType {
    /// The element types codecs accept (and a packed tensor may hold).
    pub const PACKABLE: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

    /// Every element type a checkpoint entry may have.
    pub const STORABLE: [DType; 17] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::C64,
        DType::C128,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    pub fn size(self) -> usize {
        use DType::*;
        match self {
            Bool | U8 | I8 | F8E4M3 | F8E5M2 => 1,
            F16 | BF16 | I16 | U16 => 2,
            F32 | I32 | U32 => 4,
            F64 | I64 | U64 | C64 => 8,
            C128 => 16,
        }
    }

    /// The NumPy / torch name.
    pub fn name(self) -> &'static str {
        use DType::*;
        match self {
            F32 => "float32",
            F16 => "float16",
            BF16 => "bfloat16",
            F64 => "float64",
            Bool => "bool",
            U8 => "uint8",
            I8 => "int8",
            I16 => "int16",
            I32 => "int32",
            I64 => "int64",
            U16 => "uint16",
            U32 => "uint32",
            U64 => "uint64",
            C64 => "complex64",
            C128 => "complex128",
            F8E4M3 => "float8_e4m3fn",
            F8E5M2 => "float8_e5m2",
        }
    }

    /// Whether codecs accept this type (one of [`DType::PACKABLE`]).
    pub fn is_packable(self) -> bool {
        Self::PACKABLE.contains(&self)
    }

    /// A packable type from its code (a packed tensor's header).
    pub fn from_code(code: u8) -> Result<Self> {
        Self::PACKABLE
            .into_iter()
            .find(|d| *d as u8 == code)
            .ok_or_else(|| Error::Format(format!("unknown dtype code {code} (expected 1..=4)")))
    }

    /// A packable type from its name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::PACKABLE
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                Error::Dtype(format!(
                "unsupported dtype {name:?}: expected one of float32, float16, bfloat16, float64"
            ))
            })
    }

    /// A storable type from its code (a checkpoint entry's header).
    pub fn stored_from_code(code: u8) -> Result<Self> {
        Self::STORABLE
            .into_iter()
            .find(|d| *d as u8 == code)
            .ok_or_else(|| Error::Format(format!("unknown container dtype code {code}")))
    }

    /// A storable type from its name.
    pub fn stored_from_name(name: &str) -> Result<Self> {
        Self::STORABLE
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                let all: Vec<_> = Self::STORABLE.iter().map(|d| d.name()).collect();
                Error::Dtype(format!(
                    "dtype {name:?} cannot be stored; supported: {}",
                    all.join(", ")
                ))
            })
    }
}

/// A floating-point element the kernels read and write.
pub trait Element: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: DType;
    /// Largest finite value, as f64.
    const MAX_F64: f64;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn is_finite(self) -> bool;
    /// The raw bit pattern, zero-extended.
    fn to_bits_u64(self) -> u64;
    fn from_bits_u64(bits: u64) -> Self;
    fn wrap(x: &[Self]) -> Data<'_>;
    fn wrap_mut(x: &mut [Self]) -> DataMut<'_>;
}

macro_rules! element {
    ($t:ty, $dt:expr, $variant:ident, $max:expr, $bits:ty, |$v:ident| $to:expr, |$w:ident| $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dt;
            const MAX_F64: f64 = $max;
            fn wrap(x: &[Self]) -> Data<'_> {
                Data::$variant(x)
            }
            fn wrap_mut(x: &mut [Self]) -> DataMut<'_> {
                DataMut::$variant(x)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                let $v = self;
                $to
            }
            #[inline(always)]
            fn from_f64($w: f64) -> Self {
                $from
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn to_bits_u64(self) -> u64 {
                self.to_bits() as u64
            }
            #[inline(always)]
            fn from_bits_u64(bits: u64) -> Self {
                <$t>::from_bits(bits as $bits)
            }
        }
    };
}

element!(
    f32,
    DType::F32,
    F32,
    f32::MAX as f64,
    u32,
    |v| v as f64,
    |w| w as f32
);
element!(f64, DType::F64, F64, f64::MAX, u64, |v| v, |w| w);
element!(f16, DType::F16, F16, 65504.0, u16, |v| v.to_f64(), |w| {
    f16::from_f64(w)
});
element!(
    bf16,
    DType::BF16,
    BF16,
    3.3895313892515355e38,
    u16,
    |v| v.to_f64(),
    |w| bf16::from_f64(w)
);

/// A borrowed tensor buffer of any supported dtype.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    F64(&'a [f64]),
}

/// A mutable tensor buffer of any supported dtype (the destination of a decode).
#[derive(Debug)]
pub enum DataMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
    F64(&'a mut [f64]),
}

/// An owned tensor buffer (the result of a decode when no destination was given).
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
}

/// Runs `$body` with `$x` bound to the typed slice inside a [`Data`], [`DataMut`] or [`Owned`].
#[macro_export]
macro_rules! dispatch {
    ($kind:ident, $data:expr, |$x:ident| $body:expr) => {
        match $data {
            $kind::F32($x) => $body,
            $kind::F16($x) => $body,
            $kind::BF16($x) => $body,
            $kind::F64($x) => $body,
        }
    };
}

impl<'a> Data<'a> {
    pub fn from_typed<T: Element>(x: &'a [T]) -> Self {
        T::wrap(x)
    }
    /// The elements of a packable `dtype` held in native-endian `bytes`, aligned to the element
    /// size (an empty slice may sit anywhere).
    pub fn from_bytes(dtype: DType, bytes: &'a [u8]) -> Result<Self> {
        let empty = bytes.is_empty();
        Ok(match dtype {
            DType::F32 => Data::F32(if empty { &[] } else { cast(bytes)? }),
            DType::F16 => Data::F16(if empty { &[] } else { cast(bytes)? }),
            DType::BF16 => Data::BF16(if empty { &[] } else { cast(bytes)? }),
            DType::F64 => Data::F64(if empty { &[] } else { cast(bytes)? }),
            other => return Err(not_packable(other)),
        })
    }
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::F64(_) => DType::F64,
        }
    }
    pub fn len(&self) -> usize {
        dispatch!(Data, self, |x| x.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements as little-endian bytes (what a raw payload stores).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.dtype().size());
        dispatch!(Data, self, |x| for v in x.iter() {
            let b = v.to_bits_u64().to_le_bytes();
            out.extend_from_slice(&b[..self.dtype().size()]);
        });
        out
    }
}

impl<'a> DataMut<'a> {
    /// The elements of a packable `dtype` held in native-endian `bytes`, aligned to the element
    /// size (an empty slice may sit anywhere).
    pub fn from_bytes(dtype: DType, bytes: &'a mut [u8]) -> Result<Self> {
        let empty = bytes.is_empty();
        Ok(match dtype {
            DType::F32 => DataMut::F32(if empty { &mut [] } else { cast_mut(bytes)? }),
            DType::F16 => DataMut::F16(if empty { &mut [] } else { cast_mut(bytes)? }),
            DType::BF16 => DataMut::BF16(if empty { &mut [] } else { cast_mut(bytes)? }),
            DType::F64 => DataMut::F64(if empty { &mut [] } else { cast_mut(bytes)? }),
            other => return Err(not_packable(other)),
        })
    }
    pub fn dtype(&self) -> DType {
        match self {
            DataMut::F32(_) => DType::F32,
            DataMut::F16(_) => DType::F16,
            DataMut::BF16(_) => DType::BF16,
            DataMut::F64(_) => DType::F64,
        }
    }
    pub fn len(&self) -> usize {
        dispatch!(DataMut, self, |x| x.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Owned {
    /// A zeroed buffer, allocated zeroed (calloc: fresh pages are not written; `vec![f16::ZERO;
    /// n]` would write every element) and with huge pages when large ([`crate::buf`]).
    /// `dtype` must be packable.
    pub fn zeros(dtype: DType, n: usize) -> Result<Self> {
        use crate::buf::zeroed_vec;
        Ok(match dtype {
            DType::F32 => Owned::F32(zeroed_vec(n)),
            DType::F16 => Owned::F16(zeroed_vec(n)),
            DType::BF16 => Owned::BF16(zeroed_vec(n)),
            DType::F64 => Owned::F64(zeroed_vec(n)),
            other => return Err(not_packable(other)),
        })
    }
    pub fn as_mut(&mut self) -> DataMut<'_> {
        match self {
            Owned::F32(v) => DataMut::F32(v),
            Owned::F16(v) => DataMut::F16(v),
            Owned::BF16(v) => DataMut::BF16(v),
            Owned::F64(v) => DataMut::F64(v),
        }
    }
    pub fn as_data(&self) -> Data<'_> {
        match self {
            Owned::F32(v) => Data::F32(v),
            Owned::F16(v) => Data::F16(v),
            Owned::BF16(v) => Data::BF16(v),
            Owned::F64(v) => Data::F64(v),
        }
    }
}

fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Result<&[T]> {
    bytemuck::try_cast_slice(bytes).map_err(|e| cast_error::<T>(bytes.len(), e))
}

fn cast_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> Result<&mut [T]> {
    let len = bytes.len();
    bytemuck::try_cast_slice_mut(bytes).map_err(|e| cast_error::<T>(len, e))
}

fn cast_error<T>(len: usize, e: bytemuck::PodCastError) -> Error {
    Error::Layout(format!(
        "{len} bytes cannot be viewed as elements of {} bytes: {e:?}",
        std::mem::size_of::<T>()
    ))
}

/// The error for a type codecs do not accept where one was needed.
pub(crate) fn not_packable(dtype: DType) -> Error {
    Error::Dtype(format!(
        "{} is not a codec element type (expected one of float32, float16, bfloat16, float64)",
        dtype.name()
    ))
}

/// Fills `dst` from little-endian raw bytes (the inverse of [`Data::to_le_bytes`]).
pub fn fill_from_le_bytes(dst: &mut DataMut<'_>, bytes: &[u8]) -> Result<()> {
    let size = dst.dtype().size();
    if bytes.len() != dst.len() * size {
        return Err(Error::Format(format!(
            "raw payload holds {} bytes, expected {} ({} elements of {} bytes)",
            bytes.len(),
            dst.len() * size,
            dst.len(),
            size
        )));
    }
    dispatch!(
        DataMut,
        dst,
        |x| for (v, b) in x.iter_mut().zip(bytes.chunks_exact(size)) {
            let mut w = [0u8; 8];
            w[..size].copy_from_slice(b);
            *v = Element::from_bits_u64(u64::from_le_bytes(w));
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on-disk codes, names and sizes (docs/FORMAT.md): changing any breaks stored files.
    #[test]
    fn codes_names_and_sizes_are_fixed() {
        let table: [(DType, u8, &str, usize); 17] = [
            (DType::F32, 1, "float32", 4),
            (DType::F16, 2, "float16", 2),
            (DType::BF16, 3, "bfloat16", 2),
            (DType::F64, 4, "float64", 8),
            (DType::Bool, 10, "bool", 1),
            (DType::U8, 11, "uint8", 1),
            (DType::I8, 12, "int8", 1),
            (DType::I16, 13, "int16", 2),
            (DType::I32, 14, "int32", 4),
            (DType::I64, 15, "int64", 8),
            (DType::U16, 16, "uint16", 2),
            (DType::U32, 17, "uint32", 4),
            (DType::U64, 18, "uint64", 8),
            (DType::C64, 20, "complex64", 8),
            (DType::C128, 21, "complex128", 16),
            (DType::F8E4M3, 22, "float8_e4m3fn", 1),
            (DType::F8E5M2, 23, "float8_e5m2", 1),
        ];
        assert_eq!(DType::STORABLE.len(), table.len());
        for (d, code, name, size) in table {
            assert_eq!((d as u8, d.name(), d.size()), (code, name, size));
            assert_eq!(DType::stored_from_code(code), Ok(d));
            assert_eq!(DType::stored_from_name(name), Ok(d));
            let packable = code <= 4;
            assert_eq!(d.is_packable(), packable, "{name}");
            assert_eq!(DType::from_code(code).is_ok(), packable, "{name}");
            assert_eq!(DType::from_name(name).is_ok(), packable, "{name}");
        }
        assert!(DType::stored_from_code(5).is_err());
        assert!(DType::stored_from_name("float128").is_err());
    }

    #[test]
    fn views_of_bytes() {
        let v = [1.5f32, -2.0];
        let bytes: &[u8] = bytemuck::cast_slice(&v);
        assert!(matches!(Data::from_bytes(DType::F32, bytes), Ok(Data::F32(x)) if x == v));
        assert!(matches!(Data::from_bytes(DType::F64, &[]), Ok(Data::F64(x)) if x.is_empty()));
        assert!(matches!(
            Data::from_bytes(DType::I32, bytes),
            Err(Error::Dtype(_))
        ));
        assert!(matches!(Owned::zeros(DType::U8, 3), Err(Error::Dtype(_))));
        let mut w = [0u64; 2];
        let out: &mut [u8] = bytemuck::cast_slice_mut(&mut w);
        assert_eq!(DataMut::from_bytes(DType::F16, out).unwrap().len(), 8);
        assert!(Data::from_bytes(DType::F32, &bytes[..7]).is_err());
    }
}
