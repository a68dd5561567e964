//! Evaluating a checked condition against one message, with edgeHub's semantics: three-valued
//! logic (`undefined AND false` is false), `null` as its own logic value (`null AND x` is null,
//! `null OR x` is `x`, a condition that ends null is false), a property sent without a value
//! as null, NaN as undefined while infinities are numbers, and `$body` values compared across
//! types by type order (bool < number < string < null) the way edgeHub's body queries do.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use super::compile::{Arith, Cmp, Fallback, Node, Step, Ty};
use crate::context::MessageContext;

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    /// NaN stands for undefined, as in edgeHub.
    Number(f64),
    Str(Cow<'a, str>),
    /// A `$body` object or array: undefined to everything but `IS_OBJECT`/`IS_ARRAY`.
    Object {
        array: bool,
    },
}

impl<'a> Val<'a> {
    pub fn number(n: f64) -> Val<'a> {
        if n.is_nan() {
            Val::Undefined
        } else {
            Val::Number(n)
        }
    }

    pub fn is_defined(&self) -> bool {
        match self {
            Val::Undefined | Val::Object { .. } => false,
            Val::Number(n) => !n.is_nan(),
            _ => true,
        }
    }

    fn from_json(v: &'a Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => n.as_f64().map_or(Val::Undefined, Val::number),
            Value::String(s) => Val::Str(Cow::Borrowed(s)),
            Value::Array(_) => Val::Object { array: true },
            Value::Object(_) => Val::Object { array: false },
        }
    }

    /// Three-valued truth: `Some(bool)`, or `None` for undefined.
    fn truth(&self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// A condition's outcome for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Undefined,
}

/// The outcome of a condition of type `ty` that evaluated to `v`: a bool is itself, a null
/// condition is false, anything else (a number, a string, a non-bool `$body` value) is
/// undefined.
pub fn truth(ty: Ty, v: &Val) -> Truth {
    match (ty, v) {
        (Ty::Null, _) => Truth::False,
        (Ty::Bool | Ty::Body, Val::Bool(true)) => Truth::True,
        (Ty::Bool | Ty::Body, Val::Bool(false)) => Truth::False,
        _ => Truth::Undefined,
    }
}

fn walk<'v>(mut value: &'v Value, path: &[Step]) -> Option<&'v Value> {
    for step in path {
        value = match (step, value) {
            (Step::Key(k), Value::Object(map)) => map.get(k)?,
            (Step::Index(i), Value::Array(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

fn body<'a>(ctx: &'a MessageContext<'_>, path: &[Step]) -> Val<'a> {
    ctx.body()
        .and_then(|b| walk(b, path))
        .map_or(Val::Undefined, Val::from_json)
}

fn system<'a>(ctx: &'a MessageContext<'_>, name: &str) -> Val<'a> {
    ctx.system_property(name)
        .map_or(Val::Undefined, |s| Val::Str(Cow::Borrowed(s)))
}

fn property<'a>(ctx: &'a MessageContext<'_>, name: &str) -> Option<Val<'a>> {
    ctx.app_property(name).map(|v| match v {
        Some(s) => Val::Str(Cow::Borrowed(s)),
        None => Val::Null,
    })
}

/// Rank of a `$body` value's type when types differ, as edgeHub orders them.
fn rank(v: &Val) -> u8 {
    match v {
        Val::Bool(_) => 1,
        Val::Number(_) => 2,
        Val::Str(_) => 3,
        Val::Null => 4,
        _ => 5,
    }
}

fn ordering(op: Cmp, o: Ordering) -> bool {
    match op {
        Cmp::Eq => o == Ordering::Equal,
        Cmp::Ne => o != Ordering::Equal,
        Cmp::Lt => o == Ordering::Less,
        Cmp::Le => o != Ordering::Greater,
        Cmp::Gt => o == Ordering::Greater,
        Cmp::Ge => o != Ordering::Less,
    }
}

fn compare(op: Cmp, family: Ty, a: &Val, b: &Val) -> Val<'static> {
    let result = match family {
        Ty::String => match (a, b) {
            (Val::Str(x), Val::Str(y)) => ordering(op, x.as_ref().cmp(y.as_ref())),
            _ => return Val::Undefined,
        },
        Ty::Number => match (a, b) {
            (Val::Number(x), Val::Number(y)) => match x.partial_cmp(y) {
                Some(o) => ordering(op, o),
                None => return Val::Undefined,
            },
            _ => return Val::Undefined,
        },
        Ty::Bool => match (a, b) {
            (Val::Bool(x), Val::Bool(y)) => ordering(op, x.cmp(y)),
            _ => return Val::Undefined,
        },
        Ty::Null => ordering(op, Ordering::Equal),
        Ty::Undefined => return Val::Undefined,
        Ty::Body => {
            if !a.is_defined() || !b.is_defined() {
                return Val::Undefined;
            }
            let o = match (a, b) {
                (Val::Bool(x), Val::Bool(y)) => x.cmp(y),
                (Val::Number(x), Val::Number(y)) => match x.partial_cmp(y) {
                    Some(o) => o,
                    None => return Val::Undefined,
                },
                (Val::Str(x), Val::Str(y)) => x.as_ref().cmp(y.as_ref()),
                (Val::Null, Val::Null) => Ordering::Equal,
                _ => rank(a).cmp(&rank(b)),
            };
            ordering(op, o)
        }
    };
    Val::Bool(result)
}

/// Kleene AND / OR over bools and undefined.
fn and3(a: Option<bool>, b: Option<bool>) -> Val<'static> {
    match (a, b) {
        (Some(false), _) | (_, Some(false)) => Val::Bool(false),
        (Some(true), Some(true)) => Val::Bool(true),
        _ => Val::Undefined,
    }
}

fn or3(a: Option<bool>, b: Option<bool>) -> Val<'static> {
    match (a, b) {
        (Some(true), _) | (_, Some(true)) => Val::Bool(true),
        (Some(false), Some(false)) => Val::Bool(false),
        _ => Val::Undefined,
    }
}

pub fn eval<'a>(node: &'a Node, ctx: &'a MessageContext<'_>) -> Val<'a> {
    match node {
        Node::Number(n) => Val::number(*n),
        Node::Str(s) => Val::Str(Cow::Borrowed(s)),
        Node::Bool(b) => Val::Bool(*b),
        Node::Null => Val::Null,
        Node::Undefined => Val::Undefined,
        Node::Property(name) => property(ctx, name).unwrap_or(Val::Undefined),
        Node::Dollar { name, fallback } => match property(ctx, name) {
            Some(v) => v,
            None => match fallback {
                Fallback::Body(path) => body(ctx, path),
                Fallback::System(s) => system(ctx, s),
            },
        },
        Node::Body(path) => body(ctx, path),
        Node::System(name) => system(ctx, name),
        Node::Call(f, args) => {
            let mut vals: Vec<Val<'a>> = args.iter().map(|a| eval(a, ctx)).collect();
            f.call(&mut vals)
        }
        Node::TwinChangeIncludes(path) => {
            Val::Bool(ctx.body().and_then(|b| walk(b, path)).is_some())
        }
        Node::Neg(inner, _) => match eval(inner, ctx) {
            Val::Number(n) => Val::number(-n),
            _ => Val::Undefined,
        },
        Node::Not(inner, ty) => match (ty, eval(inner, ctx)) {
            (Ty::Null, _) => Val::Bool(true),
            (_, Val::Bool(b)) => Val::Bool(!b),
            _ => Val::Undefined,
        },
        Node::Arith(op, l, r, _) => match (eval(l, ctx), eval(r, ctx)) {
            (Val::Number(a), Val::Number(b)) => Val::number(match op {
                Arith::Add => a + b,
                Arith::Sub => a - b,
                Arith::Mul => a * b,
                Arith::Div => a / b,
                Arith::Rem => a % b,
            }),
            _ => Val::Undefined,
        },
        Node::Concat(l, r) => {
            let mut vals = vec![eval(l, ctx), eval(r, ctx)];
            super::builtins::Builtin::Concat.call(&mut vals)
        }
        Node::Cmp(op, l, r, family) => compare(*op, *family, &eval(l, ctx), &eval(r, ctx)),
        Node::And(l, r, lt, rt) => {
            let (a, b) = (eval(l, ctx), eval(r, ctx));
            if *lt == Ty::Body || *rt == Ty::Body {
                // Both must be bools at run time; anything else is undefined.
                return match (a.truth(), b.truth()) {
                    (Some(x), Some(y)) => Val::Bool(x && y),
                    _ => Val::Undefined,
                };
            }
            if *lt == Ty::Null || *rt == Ty::Null {
                return Val::Null;
            }
            and3(a.truth(), b.truth())
        }
        Node::Or(l, r, lt, rt) => {
            let (a, b) = (eval(l, ctx), eval(r, ctx));
            if *lt == Ty::Body || *rt == Ty::Body {
                return match (a.truth(), b.truth()) {
                    (Some(x), Some(y)) => Val::Bool(x || y),
                    _ => Val::Undefined,
                };
            }
            match (lt, rt) {
                (Ty::Null, Ty::Null) => Val::Null,
                (Ty::Null, _) => b,
                (_, Ty::Null) => a,
                _ => or3(a.truth(), b.truth()),
            }
        }
        Node::Coalesce(l, r, lt) => {
            if *lt == Ty::Undefined {
                return eval(r, ctx);
            }
            let a = eval(l, ctx);
            if a.is_defined() {
                a
            } else {
                eval(r, ctx)
            }
        }
    }
}
