//! Element types the codecs accept, and the trait that lets kernels be generic over them.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element type of a tensor. The discriminant is the on-disk code (docs/FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    F64 = 4,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
        }
    }

    pub fn from_code(code: u8) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| *d as u8 == code)
            .ok_or_else(|| Error::Format(format!("unknown dtype code {code} (expected 1..=4)")))
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                Error::Dtype(format!(
                "unsupported dtype {name:?}: expected one of float32, float16, bfloat16, float64"
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

impl DataMut<'_> {
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
    pub fn zeros(dtype: DType, n: usize) -> Self {
        use crate::buf::zeroed_vec;
        match dtype {
            DType::F32 => Owned::F32(zeroed_vec(n)),
            DType::F16 => Owned::F16(zeroed_vec(n)),
            DType::BF16 => Owned::BF16(zeroed_vec(n)),
            DType::F64 => Owned::F64(zeroed_vec(n)),
        }
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
