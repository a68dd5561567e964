//! The functions a route condition may call: edgeHub's built-ins with their signatures, plus
//! IoT Hub message routing's `IS_ARRAY`, `IS_OBJECT` and `IS_PRIMITIVE`. Names are matched in
//! any case. A call whose argument types fit no signature is refused when the route is
//! installed; a `$body` argument fits any and is checked per message (undefined if wrong).

use super::compile::Ty;
use super::eval::Val;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Abs,
    Exp,
    Power,
    Square,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    AsNumber,
    IsBool,
    IsDefined,
    IsNull,
    IsNumber,
    IsString,
    IsArray,
    IsObject,
    IsPrimitive,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
}

/// Argument types and the result type.
#[derive(Debug, Clone, Copy)]
pub enum Signature {
    Fixed(&'static [Ty], Ty),
    /// Any one argument.
    Any(Ty),
    /// At least `min` arguments of one type.
    Many(usize, Ty, Ty),
}

const NUMBER_TO_NUMBER: &[Signature] = &[Signature::Fixed(&[Ty::Number], Ty::Number)];
const STRING_TO_STRING: &[Signature] = &[Signature::Fixed(&[Ty::String], Ty::String)];
const STRINGS_TO_BOOL: &[Signature] = &[Signature::Fixed(&[Ty::String, Ty::String], Ty::Bool)];
const ANY_TO_BOOL: &[Signature] = &[Signature::Any(Ty::Bool)];

impl Signature {
    fn result(self, args: &[Ty]) -> Option<Ty> {
        match self {
            Signature::Fixed(want, out) => (want.len() == args.len()
                && want.iter().zip(args).all(|(w, g)| w.accepts(*g)))
            .then_some(out),
            Signature::Any(out) => (args.len() == 1).then_some(out),
            Signature::Many(min, want, out) => {
                (args.len() >= min && args.iter().all(|g| want.accepts(*g))).then_some(out)
            }
        }
    }

    pub fn describe_all(all: &[Signature]) -> String {
        all.iter()
            .map(|s| match s {
                Signature::Fixed(want, _) => format!(
                    "({})",
                    want.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
                ),
                Signature::Any(_) => "(any one value)".into(),
                Signature::Many(min, want, _) => format!("({min} or more {}s)", want.name()),
            })
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

impl Builtin {
    pub fn by_name(name: &str) -> Option<Builtin> {
        use Builtin::*;
        Some(match name.to_ascii_lowercase().as_str() {
            "abs" => Abs,
            "exp" => Exp,
            "power" => Power,
            "square" => Square,
            "ceiling" => Ceiling,
            "floor" => Floor,
            "sign" => Sign,
            "sqrt" => Sqrt,
            "as_number" => AsNumber,
            "is_bool" => IsBool,
            "is_defined" => IsDefined,
            "is_null" => IsNull,
            "is_number" => IsNumber,
            "is_string" => IsString,
            "is_array" => IsArray,
            "is_object" => IsObject,
            "is_primitive" => IsPrimitive,
            "concat" => Concat,
            "length" => Length,
            "lower" => Lower,
            "upper" => Upper,
            "substring" => Substring,
            "index_of" => IndexOf,
            "starts_with" => StartsWith,
            "ends_with" => EndsWith,
            "contains" => Contains,
            _ => return None,
        })
    }

    pub fn name(self) -> String {
        format!("{self:?}")
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                sep.into_iter()
                    .chain(std::iter::once(c.to_ascii_uppercase()))
            })
            .collect()
    }

    pub fn signatures(self) -> &'static [Signature] {
        use Builtin::*;
        match self {
            Abs | Exp | Square | Ceiling | Floor | Sign | Sqrt => NUMBER_TO_NUMBER,
            Power => &[Signature::Fixed(&[Ty::Number, Ty::Number], Ty::Number)],
            AsNumber => &[
                Signature::Fixed(&[Ty::String], Ty::Number),
                Signature::Fixed(&[Ty::Number], Ty::Number),
            ],
            IsBool | IsDefined | IsNull | IsNumber | IsString | IsArray | IsObject
            | IsPrimitive => ANY_TO_BOOL,
            Concat => &[Signature::Many(2, Ty::String, Ty::String)],
            Length => &[Signature::Fixed(&[Ty::String], Ty::Number)],
            Lower | Upper => STRING_TO_STRING,
            Substring => &[
                Signature::Fixed(&[Ty::String, Ty::Number], Ty::String),
                Signature::Fixed(&[Ty::String, Ty::Number, Ty::Number], Ty::String),
            ],
            IndexOf => &[Signature::Fixed(&[Ty::String, Ty::String], Ty::Number)],
            StartsWith | EndsWith | Contains => STRINGS_TO_BOOL,
        }
    }

    /// The result type for these argument types, `None` when no signature fits.
    pub fn check(self, args: &[Ty]) -> Option<Ty> {
        self.signatures().iter().find_map(|s| s.result(args))
    }

    /// Runs the function on evaluated arguments.
    pub fn call<'a>(self, args: &mut Vec<Val<'a>>) -> Val<'a> {
        use Builtin::*;
        let number = |v: &Val| match v {
            Val::Number(n) if !n.is_nan() => Some(*n),
            _ => None,
        };
        let math = |args: &[Val], f: fn(f64) -> f64| match number(&args[0]) {
            Some(n) => Val::number(f(n)),
            None => Val::Undefined,
        };
        match self {
            Abs => math(args, f64::abs),
            Exp => math(args, f64::exp),
            Square => math(args, |n| n * n),
            Ceiling => math(args, f64::ceil),
            Floor => math(args, f64::floor),
            Sqrt => math(args, f64::sqrt),
            Sign => math(args, |n| {
                if n > 0.0 {
                    1.0
                } else if n < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }),
            Power => match (number(&args[0]), number(&args[1])) {
                (Some(a), Some(b)) => Val::number(a.powf(b)),
                _ => Val::Undefined,
            },
            AsNumber => match &args[0] {
                Val::Number(n) => Val::number(*n),
                Val::Str(s) => parse_number(s).map_or(Val::Undefined, Val::number),
                _ => Val::Undefined,
            },
            IsBool => Val::Bool(matches!(args[0], Val::Bool(_))),
            IsDefined => Val::Bool(args[0].is_defined()),
            IsNull => Val::Bool(matches!(args[0], Val::Null)),
            IsNumber => Val::Bool(matches!(args[0], Val::Number(n) if n.is_finite())),
            IsString => Val::Bool(matches!(args[0], Val::Str(_))),
            IsArray => Val::Bool(matches!(args[0], Val::Object { array: true })),
            IsObject => Val::Bool(matches!(args[0], Val::Object { array: false })),
            IsPrimitive => Val::Bool(
                matches!(
                    args[0],
                    Val::Null | Val::Bool(_) | Val::Number(_) | Val::Str(_)
                ) && args[0].is_defined(),
            ),
            Concat => {
                let mut out = String::new();
                for a in args.iter() {
                    match a {
                        Val::Str(s) => out.push_str(s),
                        // A property sent without a value joins as nothing, as in edgeHub.
                        Val::Null => {}
                        _ => return Val::Undefined,
                    }
                }
                Val::Str(out.into())
            }
            Length => match &args[0] {
                Val::Str(s) => Val::Number(s.encode_utf16().count() as f64),
                _ => Val::Undefined,
            },
            Lower => match &args[0] {
                Val::Str(s) => Val::Str(s.to_lowercase().into()),
                _ => Val::Undefined,
            },
            Upper => match &args[0] {
                Val::Str(s) => Val::Str(s.to_uppercase().into()),
                _ => Val::Undefined,
            },
            Substring => substring(args),
            IndexOf => match (&args[0], &args[1]) {
                (Val::Str(s), Val::Str(sub)) => Val::Number(match s.find(sub.as_ref()) {
                    Some(byte) => s[..byte].encode_utf16().count() as f64,
                    None => -1.0,
                }),
                _ => Val::Undefined,
            },
            StartsWith | EndsWith | Contains => match (&args[0], &args[1]) {
                (Val::Str(s), Val::Str(p)) => Val::Bool(match self {
                    StartsWith => s.starts_with(p.as_ref()),
                    EndsWith => s.ends_with(p.as_ref()),
                    _ => s.contains(p.as_ref()),
                }),
                _ => Val::Undefined,
            },
        }
    }
}

/// A string read as a number the way .NET's invariant `double.TryParse` reads it: digits
/// with an optional sign, point and exponent, surrounding spaces allowed; `Infinity` too.
fn parse_number(s: &str) -> Option<f64> {
    let t = s.trim();
    match t {
        "Infinity" | "+Infinity" => return Some(f64::INFINITY),
        "-Infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let plain = t
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | 'e' | 'E'));
    if !plain || t.is_empty() {
        return None;
    }
    t.parse::<f64>().ok()
}

/// `SUBSTRING(s, start[, length])` in UTF-16 units as .NET counts them: a start past the
/// end, a negative start or length, or a length past the end is undefined.
fn substring<'a>(args: &[Val<'a>]) -> Val<'a> {
    let Val::Str(s) = &args[0] else {
        return Val::Undefined;
    };
    let Val::Number(start) = args[1] else {
        return Val::Undefined;
    };
    let units: Vec<u16> = s.encode_utf16().collect();
    let len = units.len() as f64;
    if start.is_nan() || start < 0.0 {
        return Val::Undefined;
    }
    let (from, to) = match args.get(2) {
        None => {
            if start > len {
                return Val::Undefined;
            }
            (start as usize, units.len())
        }
        Some(Val::Number(n)) => {
            if start >= len || n.is_nan() || *n < 0.0 || *n > len - start {
                return Val::Undefined;
            }
            (start as usize, start as usize + *n as usize)
        }
        Some(_) => return Val::Undefined,
    };
    Val::Str(String::from_utf16_lossy(&units[from..to.min(units.len())]).into())
}
