//! Element types.
use half::{bf16, f16};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// Unsigned byte (packed quantized data).
    U8,
    /// Signed byte (int8 weights).
    I8,
    /// 32-bit signed integer (token ids, labels, positions).
    I32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 | DType::I8 => 1,
        }
    }

    /// Whether the type is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Short lower-case name (`f32`, `bf16`, ...), as in kernel names.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::I32 => "i32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that can be an element of a [`crate::Tensor`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts to f64 (for references and checks).
    fn to_f64(self) -> f64;
    /// Converts from f32, rounding to nearest.
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident, |$x:ident| $to:expr, |$y:ident| $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn to_f64(self) -> f64 {
                let $x = self;
                $to
            }
            fn from_f32(v: f32) -> Self {
                let $y = v;
                $from
            }
        }
    };
}
element!(f32, F32, |x| x as f64, |y| y);
element!(bf16, BF16, |x| x.to_f64(), |y| bf16::from_f32(y));
element!(f16, F16, |x| x.to_f64(), |y| f16::from_f32(y));
element!(u8, U8, |x| x as f64, |y| y as u8);
element!(i8, I8, |x| x as f64, |y| y as i8);
element!(i32, I32, |x| x as f64, |y| y as i32);
