//! Codec parameters as plain data: what Python passes in as keyword arguments and gets back from
//! `PackedTensor.params` / `get_config()`.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;

/// One parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Explicitly unset (Python `None`), e.g. "draw a fresh seed".
    None,
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Bool(b) => write!(f, "{}", if *b { "True" } else { "False" }),
            Param::Int(i) => write!(f, "{i}"),
            Param::Float(x) => write!(f, "{x}"),
            Param::Str(s) => write!(f, "{s:?}"),
            Param::None => write!(f, "None"),
        }
    }
}

/// Named parameters, sorted by name.
pub type Params = BTreeMap<String, Param>;

/// Params from `(name, value)` pairs.
pub fn from_pairs<const N: usize>(pairs: [(&str, Param); N]) -> Params {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Reads typed values out of user-given [`Params`], rejecting unknown names and bad values.
pub struct ParamReader<'a> {
    codec: &'static str,
    given: &'a Params,
    known: Vec<&'static str>,
}

impl<'a> ParamReader<'a> {
    pub fn new(codec: &'static str, given: &'a Params) -> Self {
        Self {
            codec,
            given,
            known: Vec::new(),
        }
    }

    fn bad(&self, name: &str, want: &str, got: &Param) -> Error {
        Error::Codec(format!(
            "codec {:?}: parameter {name} must be {want}, got {got}",
            self.codec
        ))
    }

    fn get(&mut self, name: &'static str) -> Option<&'a Param> {
        self.known.push(name);
        self.given.get(name)
    }

    pub fn int(&mut self, name: &'static str, default: i64, lo: i64, hi: i64) -> Result<i64> {
        match self.get(name) {
            None => Ok(default),
            Some(Param::Int(v)) if (lo..=hi).contains(v) => Ok(*v),
            Some(p) => Err(self.bad(name, &format!("an integer in {lo}..={hi}"), p)),
        }
    }

    pub fn opt_u64(&mut self, name: &'static str) -> Result<Option<u64>> {
        match self.get(name) {
            None | Some(Param::None) => Ok(None),
            Some(Param::Int(v)) if *v >= 0 => Ok(Some(*v as u64)),
            Some(p) => Err(self.bad(name, "a non-negative integer or None", p)),
        }
    }

    pub fn float(&mut self, name: &'static str, default: f64, lo: f64, hi: f64) -> Result<f64> {
        let v = match self.get(name) {
            None => return Ok(default),
            Some(Param::Float(v)) => *v,
            Some(Param::Int(v)) => *v as f64,
            Some(p) => return Err(self.bad(name, &format!("a number in [{lo}, {hi}]"), p)),
        };
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(self.bad(name, &format!("a number in [{lo}, {hi}]"), &Param::Float(v)))
        }
    }

    pub fn bool(&mut self, name: &'static str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(Param::Bool(b)) => Ok(*b),
            Some(p) => Err(self.bad(name, "True or False", p)),
        }
    }

    /// One of `choices`, returned as its index.
    pub fn choice(
        &mut self,
        name: &'static str,
        default: usize,
        choices: &[&str],
    ) -> Result<usize> {
        match self.get(name) {
            None => Ok(default),
            Some(Param::Str(s)) if choices.contains(&s.as_str()) => {
                Ok(choices.iter().position(|c| c == s).unwrap())
            }
            Some(p) => Err(self.bad(name, &format!("one of {choices:?}"), p)),
        }
    }

    /// Fails if the caller passed a name no getter asked for.
    pub fn finish(self) -> Result<()> {
        if let Some(unknown) = self
            .given
            .keys()
            .find(|k| !self.known.contains(&k.as_str()))
        {
            return Err(Error::Codec(format!(
                "codec {:?} has no parameter {unknown:?}; its parameters are: {}",
                self.codec,
                self.known.join(", ")
            )));
        }
        Ok(())
    }
}
