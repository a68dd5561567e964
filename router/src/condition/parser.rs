//! Recursive-descent parser: tokens to [`Expr`].
//!
//! Precedence, lowest first: `OR`, `AND`, `NOT`, comparison / `IN` / `NIN`, `+ -`, `* / %`,
//! unary minus, primary (literal, reference, call, parenthesised, list).

use serde_json::Value;

use super::lexer::{Spanned, Tok};
use super::ParseError;

#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// The built-in functions, with their arity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    IsDefined,
    IsNull,
    IsString,
    IsNumber,
    IsBool,
    IsObject,
    IsArray,
    IsPrimitive,
    AsNumber,
    Abs,
    Ceiling,
    Floor,
    Exp,
    Power,
    Sign,
    Sqrt,
    Square,
    Length,
    Lower,
    Upper,
    Concat,
    Contains,
    StartsWith,
    EndsWith,
    IndexOf,
    Substring,
}

impl Func {
    fn by_name(name: &str) -> Option<Func> {
        use Func::*;
        Some(match name.to_ascii_uppercase().as_str() {
            "IS_DEFINED" => IsDefined,
            "IS_NULL" => IsNull,
            "IS_STRING" => IsString,
            "IS_NUMBER" => IsNumber,
            "IS_BOOL" => IsBool,
            "IS_OBJECT" => IsObject,
            "IS_ARRAY" => IsArray,
            "IS_PRIMITIVE" => IsPrimitive,
            "AS_NUMBER" => AsNumber,
            "ABS" => Abs,
            "CEILING" => Ceiling,
            "FLOOR" => Floor,
            "EXP" => Exp,
            "POWER" => Power,
            "SIGN" => Sign,
            "SQRT" => Sqrt,
            "SQUARE" => Square,
            "LENGTH" => Length,
            "LOWER" => Lower,
            "UPPER" => Upper,
            "CONCAT" => Concat,
            "CONTAINS" => Contains,
            "STARTS_WITH" => StartsWith,
            "ENDS_WITH" => EndsWith,
            "INDEX_OF" => IndexOf,
            "SUBSTRING" => Substring,
            _ => return None,
        })
    }

    /// (min, max) arguments.
    fn arity(self) -> (usize, usize) {
        use Func::*;
        match self {
            Power | Contains | StartsWith | EndsWith | IndexOf => (2, 2),
            Substring => (3, 3),
            Concat => (2, 64),
            _ => (1, 1),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    Ref(Vec<Segment>),
    List(Vec<Expr>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    In {
        negated: bool,
        item: Box<Expr>,
        list: Vec<Expr>,
    },
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Call(Func, Vec<Expr>),
}

pub struct Parser {
    tokens: Vec<Spanned>,
    pos: usize,
    /// How deep the tree being built is on the current path: every nesting (parentheses,
    /// lists, calls, NOT, unary minus) and every operator of a chain adds one. Evaluating and
    /// dropping a tree recurse through it, so outside input must not make it deeper than
    /// [`MAX_DEPTH`].
    depth: usize,
}

/// The deepest expression tree accepted: far beyond any real condition, far below what
/// would exhaust a thread's stack while parsing, evaluating or dropping it.
pub const MAX_DEPTH: usize = 128;

const KEYWORDS: [&str; 8] = ["AND", "OR", "NOT", "IN", "NIN", "TRUE", "FALSE", "NULL"];

impl Parser {
    pub fn new(tokens: Vec<Spanned>) -> Parser {
        Parser {
            tokens,
            pos: 0,
            depth: 0,
        }
    }

    pub(crate) fn peek(&self) -> &Spanned {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    pub(crate) fn next(&mut self) -> Spanned {
        let t = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    pub(crate) fn error(&self, expected: &str) -> ParseError {
        let t = self.peek();
        ParseError::new(t.column, expected, &t.tok.describe())
    }

    /// True (and consumed) when the next token is the keyword `kw` (any case).
    pub(crate) fn keyword(&mut self, kw: &str) -> bool {
        if matches!(&self.peek().tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn expect_keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        if self.keyword(kw) {
            Ok(())
        } else {
            Err(self.error(kw))
        }
    }

    pub(crate) fn expect(&mut self, tok: Tok) -> Result<(), ParseError> {
        if self.peek().tok == tok {
            self.next();
            Ok(())
        } else {
            Err(self.error(&tok.describe()))
        }
    }

    pub fn expect_end(&self) -> Result<(), ParseError> {
        if self.peek().tok == Tok::End {
            Ok(())
        } else {
            Err(self.error("an operator or end of input"))
        }
    }

    /// One level deeper, refused past [`MAX_DEPTH`].
    fn deeper(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let t = self.peek();
            return Err(ParseError::new(
                t.column,
                &format!("an expression nested at most {MAX_DEPTH} levels deep"),
                "deeper nesting",
            ));
        }
        Ok(())
    }

    pub fn expression(&mut self) -> Result<Expr, ParseError> {
        self.or()
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let base = self.depth;
        let mut left = self.and()?;
        while self.keyword("OR") {
            self.deeper()?;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        self.depth = base;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let base = self.depth;
        let mut left = self.not()?;
        while self.keyword("AND") {
            self.deeper()?;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        self.depth = base;
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.keyword("NOT") {
            let base = self.depth;
            self.deeper()?;
            let e = Expr::Not(Box::new(self.not()?));
            self.depth = base;
            return Ok(e);
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.additive()?;
        let op = match self.peek().tok {
            Tok::Eq => Some(CmpOp::Eq),
            Tok::Ne => Some(CmpOp::Ne),
            Tok::Lt => Some(CmpOp::Lt),
            Tok::Gt => Some(CmpOp::Gt),
            Tok::Le => Some(CmpOp::Le),
            Tok::Ge => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.next();
            let base = self.depth;
            self.deeper()?;
            let right = self.additive()?;
            self.depth = base;
            return Ok(Expr::Cmp(op, Box::new(left), Box::new(right)));
        }
        for (kw, negated) in [("IN", false), ("NIN", true)] {
            if self.keyword(kw) {
                self.expect(Tok::LBracket)?;
                let list = self.items(Tok::RBracket)?;
                return Ok(Expr::In {
                    negated,
                    item: Box::new(left),
                    list,
                });
            }
        }
        Ok(left)
    }

    fn additive(&mut self) -> Result<Expr, ParseError> {
        let base = self.depth;
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek().tok {
                Tok::Plus => ArithOp::Add,
                Tok::Minus => ArithOp::Sub,
                _ => break,
            };
            self.next();
            self.deeper()?;
            left = Expr::Arith(op, Box::new(left), Box::new(self.multiplicative()?));
        }
        self.depth = base;
        Ok(left)
    }

    fn multiplicative(&mut self) -> Result<Expr, ParseError> {
        let base = self.depth;
        let mut left = self.unary()?;
        loop {
            let op = match self.peek().tok {
                Tok::Star => ArithOp::Mul,
                Tok::Slash => ArithOp::Div,
                Tok::Percent => ArithOp::Rem,
                _ => break,
            };
            self.next();
            self.deeper()?;
            left = Expr::Arith(op, Box::new(left), Box::new(self.unary()?));
        }
        self.depth = base;
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.peek().tok == Tok::Minus {
            self.next();
            let base = self.depth;
            self.deeper()?;
            let e = Expr::Neg(Box::new(self.unary()?));
            self.depth = base;
            return Ok(e);
        }
        self.primary()
    }

    /// Comma-separated expressions up to `close` (consumed), one level deeper.
    fn items(&mut self, close: Tok) -> Result<Vec<Expr>, ParseError> {
        let base = self.depth;
        self.deeper()?;
        let mut items = Vec::new();
        if self.peek().tok == close {
            self.next();
            self.depth = base;
            return Ok(items);
        }
        loop {
            items.push(self.expression()?);
            if self.peek().tok == Tok::Comma {
                self.next();
                continue;
            }
            if self.peek().tok == close {
                self.next();
                self.depth = base;
                return Ok(items);
            }
            return Err(self.error(&format!("',' or {}", close.describe())));
        }
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let t = self.peek().clone();
        match t.tok {
            Tok::Num(n) => {
                self.next();
                let v = serde_json::Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null);
                Ok(Expr::Lit(v))
            }
            Tok::Str(s) => {
                self.next();
                Ok(Expr::Lit(Value::String(s)))
            }
            Tok::LParen => {
                self.next();
                let base = self.depth;
                self.deeper()?;
                let e = self.expression()?;
                self.expect(Tok::RParen)?;
                self.depth = base;
                Ok(e)
            }
            Tok::LBracket => {
                self.next();
                Ok(Expr::List(self.items(Tok::RBracket)?))
            }
            Tok::Ident(name) => {
                let upper = name.to_ascii_uppercase();
                match upper.as_str() {
                    "TRUE" => {
                        self.next();
                        return Ok(Expr::Lit(Value::Bool(true)));
                    }
                    "FALSE" => {
                        self.next();
                        return Ok(Expr::Lit(Value::Bool(false)));
                    }
                    "NULL" => {
                        self.next();
                        return Ok(Expr::Lit(Value::Null));
                    }
                    _ if KEYWORDS.contains(&upper.as_str()) => {
                        return Err(self.error("an expression"))
                    }
                    _ => {}
                }
                self.next();
                if self.peek().tok == Tok::LParen {
                    let Some(func) = Func::by_name(&name) else {
                        return Err(ParseError::new(
                            t.column,
                            "a known function",
                            &format!("'{name}'"),
                        ));
                    };
                    self.next();
                    let args = self.items(Tok::RParen)?;
                    let (min, max) = func.arity();
                    if args.len() < min || args.len() > max {
                        let want = if min == max {
                            format!("{min}")
                        } else {
                            format!("{min} or more")
                        };
                        return Err(ParseError::new(
                            t.column,
                            &format!("{want} argument(s) to {}", name.to_ascii_uppercase()),
                            &format!("{}", args.len()),
                        ));
                    }
                    if func == Func::IsDefined && !matches!(args[0], Expr::Ref(_)) {
                        return Err(ParseError::new(
                            t.column,
                            "a property path inside IS_DEFINED",
                            "another expression",
                        ));
                    }
                    return Ok(Expr::Call(func, args));
                }
                let mut path = vec![Segment::Key(name)];
                loop {
                    match self.peek().tok {
                        Tok::Dot => {
                            self.next();
                            match self.peek().tok.clone() {
                                Tok::Ident(k) => {
                                    self.next();
                                    path.push(Segment::Key(k));
                                }
                                _ => return Err(self.error("a property name after '.'")),
                            }
                        }
                        Tok::LBracket => {
                            self.next();
                            match self.peek().tok.clone() {
                                Tok::Num(n) if n >= 0.0 && n.fract() == 0.0 => {
                                    self.next();
                                    path.push(Segment::Index(n as usize));
                                }
                                Tok::Str(k) => {
                                    self.next();
                                    path.push(Segment::Key(k));
                                }
                                _ => return Err(self.error("an array index or quoted name")),
                            }
                            self.expect(Tok::RBracket)?;
                        }
                        _ => return Ok(Expr::Ref(path)),
                    }
                }
            }
            _ => Err(self.error("an expression")),
        }
    }
}
