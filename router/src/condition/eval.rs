//! Three-valued evaluation: `None` is *undefined*.

use std::cmp::Ordering;

use serde_json::{Number, Value};

use super::parser::{ArithOp, CmpOp, Expr, Func, Segment};

/// Supplies the value of a reference; `None` when it does not exist.
pub trait Resolve {
    fn resolve(&self, path: &[Segment]) -> Option<Value>;
}

fn num(n: f64) -> Option<Value> {
    Number::from_f64(n).map(Value::Number)
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn as_bool(v: Option<Value>) -> Option<bool> {
    match v {
        Some(Value::Bool(b)) => Some(b),
        _ => None,
    }
}

/// Ordering of two values of the same type; `None` across types (undefined).
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> Option<bool> {
    match (a, b) {
        (Value::Array(_), Value::Array(_)) | (Value::Object(_), Value::Object(_)) => Some(a == b),
        _ => compare(a, b).map(|o| o == Ordering::Equal),
    }
}

pub fn eval(e: &Expr, ctx: &dyn Resolve) -> Option<Value> {
    match e {
        Expr::Lit(v) => Some(v.clone()),
        Expr::Ref(path) => ctx.resolve(path),
        Expr::List(items) => Some(Value::Array(
            items
                .iter()
                .map(|i| eval(i, ctx).unwrap_or(Value::Null))
                .collect(),
        )),
        Expr::Not(inner) => as_bool(eval(inner, ctx)).map(|b| Value::Bool(!b)),
        Expr::And(l, r) => match (as_bool(eval(l, ctx)), as_bool(eval(r, ctx))) {
            (Some(false), _) | (_, Some(false)) => Some(Value::Bool(false)),
            (Some(true), Some(true)) => Some(Value::Bool(true)),
            _ => None,
        },
        Expr::Or(l, r) => match (as_bool(eval(l, ctx)), as_bool(eval(r, ctx))) {
            (Some(true), _) | (_, Some(true)) => Some(Value::Bool(true)),
            (Some(false), Some(false)) => Some(Value::Bool(false)),
            _ => None,
        },
        Expr::Cmp(op, l, r) => {
            let (a, b) = (eval(l, ctx)?, eval(r, ctx)?);
            let result = match op {
                CmpOp::Eq => equal(&a, &b)?,
                CmpOp::Ne => !equal(&a, &b)?,
                CmpOp::Lt => compare(&a, &b)? == Ordering::Less,
                CmpOp::Gt => compare(&a, &b)? == Ordering::Greater,
                CmpOp::Le => compare(&a, &b)? != Ordering::Greater,
                CmpOp::Ge => compare(&a, &b)? != Ordering::Less,
            };
            Some(Value::Bool(result))
        }
        Expr::In {
            negated,
            item,
            list,
        } => {
            let v = eval(item, ctx)?;
            let found = list
                .iter()
                .filter_map(|i| eval(i, ctx))
                .any(|candidate| equal(&v, &candidate) == Some(true));
            Some(Value::Bool(found != *negated))
        }
        Expr::Arith(op, l, r) => {
            let a = as_f64(&eval(l, ctx)?)?;
            let b = as_f64(&eval(r, ctx)?)?;
            let n = match op {
                ArithOp::Add => a + b,
                ArithOp::Sub => a - b,
                ArithOp::Mul => a * b,
                ArithOp::Div if b != 0.0 => a / b,
                ArithOp::Rem if b != 0.0 => a % b,
                _ => return None,
            };
            num(n)
        }
        Expr::Neg(inner) => num(-as_f64(&eval(inner, ctx)?)?),
        Expr::Call(f, args) => call(*f, args, ctx),
    }
}

fn call(f: Func, args: &[Expr], ctx: &dyn Resolve) -> Option<Value> {
    let arg = |i: usize| eval(&args[i], ctx);
    let number = |i: usize| arg(i).and_then(|v| v.as_f64());
    let string = |i: usize| match arg(i) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let bool_of = |b: bool| Some(Value::Bool(b));
    match f {
        Func::IsDefined => bool_of(arg(0).is_some()),
        Func::IsNull => bool_of(matches!(arg(0), Some(Value::Null))),
        Func::IsString => bool_of(matches!(arg(0), Some(Value::String(_)))),
        Func::IsNumber => bool_of(matches!(arg(0), Some(Value::Number(_)))),
        Func::IsBool => bool_of(matches!(arg(0), Some(Value::Bool(_)))),
        Func::IsObject => bool_of(matches!(arg(0), Some(Value::Object(_)))),
        Func::IsArray => bool_of(matches!(arg(0), Some(Value::Array(_)))),
        Func::IsPrimitive => bool_of(matches!(
            arg(0),
            Some(Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_))
        )),
        Func::AsNumber => match arg(0)? {
            Value::Number(n) => Some(Value::Number(n)),
            Value::String(s) => num(s.trim().parse::<f64>().ok()?),
            _ => None,
        },
        Func::Abs => num(number(0)?.abs()),
        Func::Ceiling => num(number(0)?.ceil()),
        Func::Floor => num(number(0)?.floor()),
        Func::Exp => num(number(0)?.exp()),
        Func::Power => num(number(0)?.powf(number(1)?)),
        Func::Sign => {
            let n = number(0)?;
            num(if n > 0.0 {
                1.0
            } else if n < 0.0 {
                -1.0
            } else {
                0.0
            })
        }
        Func::Sqrt => {
            let n = number(0)?;
            if n < 0.0 {
                return None;
            }
            num(n.sqrt())
        }
        Func::Square => num(number(0)?.powi(2)),
        Func::Length => num(string(0)?.chars().count() as f64),
        Func::Lower => Some(Value::String(string(0)?.to_lowercase())),
        Func::Upper => Some(Value::String(string(0)?.to_uppercase())),
        Func::Concat => {
            let mut out = String::new();
            for i in 0..args.len() {
                out.push_str(&string(i)?);
            }
            Some(Value::String(out))
        }
        Func::Contains => bool_of(string(0)?.contains(string(1)?.as_str())),
        Func::StartsWith => bool_of(string(0)?.starts_with(string(1)?.as_str())),
        Func::EndsWith => bool_of(string(0)?.ends_with(string(1)?.as_str())),
        Func::IndexOf => {
            let (s, sub) = (string(0)?, string(1)?);
            let idx = s
                .find(sub.as_str())
                .map(|b| s[..b].chars().count() as f64)
                .unwrap_or(-1.0);
            num(idx)
        }
        Func::Substring => {
            let s = string(0)?;
            let (start, len) = (number(1)?, number(2)?);
            if start < 0.0 || len < 0.0 {
                return None;
            }
            Some(Value::String(
                s.chars().skip(start as usize).take(len as usize).collect(),
            ))
        }
    }
}
