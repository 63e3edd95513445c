//! Reading CDR from the network. The `cdr` crate writes the node's messages, but its
//! reader allocates a sequence's claimed length before checking it against the input
//! (a 4-byte length of 2^32-1 cost 4 GB), so untrusted samples go through this small
//! serde deserializer instead: every length is checked against the bytes left first.
use serde::de::{self, DeserializeSeed, IntoDeserializer, SeqAccess, Visitor};

/// Why bytes are not the message they claim to be.
#[derive(Debug)]
pub struct CdrError(String);

impl std::fmt::Display for CdrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CdrError {}

impl de::Error for CdrError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CdrError(msg.to_string())
    }
}

type Result<T> = std::result::Result<T, CdrError>;

/// The payload after the encapsulation header; alignment counts from its start.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    little_endian: bool,
}

impl<'a> Reader<'a> {
    /// Reads the encapsulation header: plain CDR, big- or little-endian.
    pub fn new(bytes: &'a [u8]) -> Result<Reader<'a>> {
        let (header, data) = bytes.split_at_checked(4).ok_or_else(|| {
            CdrError(format!(
                "{} bytes: shorter than the 4-byte CDR header",
                bytes.len()
            ))
        })?;
        let little_endian = match header[..2] {
            [0, 0] => false,
            [0, 1] => true,
            _ => {
                return Err(CdrError(format!(
                    "encapsulation {:02x}{:02x}: only plain CDR (0000, 0001) is read",
                    header[0], header[1]
                )));
            }
        };
        Ok(Reader {
            data,
            pos: 0,
            little_endian,
        })
    }

    fn take(&mut self, n: usize, align: usize) -> Result<&'a [u8]> {
        self.pos = self.pos.next_multiple_of(align);
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                CdrError(format!(
                    "truncated: {n} bytes wanted at offset {} of a {}-byte payload",
                    self.pos,
                    self.data.len()
                ))
            })?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b: [u8; N] = self.take(N, N)?.try_into().expect("N bytes");
        if !self.little_endian {
            b.reverse();
        }
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A sequence or string length, which the bytes left must be able to hold.
    fn len(&mut self, element_size: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        let left = self.data.len() - self.pos;
        if n.saturating_mul(element_size.max(1)) > left {
            return Err(CdrError(format!(
                "a length of {n} at offset {} with only {left} bytes left",
                self.pos - 4
            )));
        }
        Ok(n)
    }
}

macro_rules! primitive {
    ($method:ident, $visit:ident, $ty:ty, $n:expr) => {
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
            v.$visit(<$ty>::from_le_bytes(self.array::<$n>()?))
        }
    };
}

impl<'de> de::Deserializer<'de> for &mut Reader<'de> {
    type Error = CdrError;

    primitive!(deserialize_i8, visit_i8, i8, 1);
    primitive!(deserialize_u8, visit_u8, u8, 1);
    primitive!(deserialize_i16, visit_i16, i16, 2);
    primitive!(deserialize_u16, visit_u16, u16, 2);
    primitive!(deserialize_i32, visit_i32, i32, 4);
    primitive!(deserialize_u32, visit_u32, u32, 4);
    primitive!(deserialize_i64, visit_i64, i64, 8);
    primitive!(deserialize_u64, visit_u64, u64, 8);
    primitive!(deserialize_f32, visit_f32, f32, 4);
    primitive!(deserialize_f64, visit_f64, f64, 8);

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        v.visit_bool(self.array::<1>()?[0] != 0)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        // A CDR string: length with the terminating NUL, the bytes, the NUL.
        let n = self.len(1)?;
        let bytes = self.take(n, 1)?;
        let text = bytes
            .strip_suffix(&[0])
            .ok_or_else(|| CdrError("a string without its terminating NUL".into()))?;
        v.visit_string(
            String::from_utf8(text.to_vec())
                .map_err(|_| CdrError("a string that is not UTF-8".into()))?,
        )
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.deserialize_string(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        let n = self.len(1)?;
        v.visit_bytes(self.take(n, 1)?)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.deserialize_byte_buf(v)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        // Every element takes at least one byte: the bytes left bound the count.
        let n = self.len(1)?;
        v.visit_seq(Elements {
            reader: self,
            left: n,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value> {
        v.visit_seq(Elements {
            reader: self,
            left: len,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(fields.len(), v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(len, v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value> {
        let index = self.u32()?;
        v.visit_enum(index.into_deserializer())
    }

    serde::forward_to_deserialize_any! { char option unit unit_struct map identifier ignored_any }

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value> {
        Err(CdrError(
            "CDR is not self-describing: only typed messages can be read".into(),
        ))
    }
}

/// The elements of a sequence, array or struct.
struct Elements<'r, 'de> {
    reader: &'r mut Reader<'de>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Elements<'_, 'de> {
    type Error = CdrError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.reader).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}
