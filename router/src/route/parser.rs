//! Tokens to a route's parts and its condition's syntax tree, following edgeHub's grammar:
//! `[SELECT *] FROM /path [WHERE condition] INTO sink`.
//!
//! Condition precedence, tightest first, as edgeHub's ANTLR rule orders it: unary `-` and
//! `NOT` (so `NOT a = b` is `(NOT a) = b`), `* / %`, `+ - ||`, `< <= > >=`, `= != <>`, `AND`,
//! `OR`, and `??` loosest. Binary operators group to the left.

use super::lexer::{Spanned, Tok};
use crate::condition::{ParseError, MAX_DEPTH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Mul,
    Div,
    Rem,
    Add,
    Sub,
    Concat,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Coalesce,
}

impl BinOp {
    fn of(tok: &Tok) -> Option<(BinOp, u8)> {
        Some(match tok {
            Tok::Star => (BinOp::Mul, 6),
            Tok::Slash => (BinOp::Div, 6),
            Tok::Percent => (BinOp::Rem, 6),
            Tok::Plus => (BinOp::Add, 5),
            Tok::Minus => (BinOp::Sub, 5),
            Tok::Concat => (BinOp::Concat, 5),
            Tok::Lt => (BinOp::Lt, 4),
            Tok::Le => (BinOp::Le, 4),
            Tok::Gt => (BinOp::Gt, 4),
            Tok::Ge => (BinOp::Ge, 4),
            Tok::Eq => (BinOp::Eq, 3),
            Tok::Ne => (BinOp::Ne, 3),
            Tok::And => (BinOp::And, 2),
            Tok::Or => (BinOp::Or, 1),
            Tok::Coalesce => (BinOp::Coalesce, 0),
            _ => return None,
        })
    }

    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Concat => "||",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "=",
            BinOp::Ne => "!=",
            BinOp::And => "AND",
            BinOp::Or => "OR",
            BinOp::Coalesce => "??",
        }
    }
}

/// A condition as written, before its types are checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Ast {
    Number(f64),
    Str(String),
    Bool(bool),
    Null,
    Undefined,
    /// A name: an application property.
    Property(String),
    /// `$name` or `$body.path`: an application property of that name, else a `$body` query or a
    /// system property.
    Dollar {
        text: String,
        column: usize,
    },
    /// `{$name}`: the system property or `$body` query, never an application property.
    Escaped {
        text: String,
        column: usize,
    },
    Call {
        name: String,
        args: Vec<Ast>,
        /// The arguments as written (`twin_change_includes` reads a path, not a value).
        raw_args: String,
        column: usize,
    },
    Neg(Box<Ast>, usize),
    Not(Box<Ast>, usize),
    Binary {
        op: BinOp,
        left: Box<Ast>,
        right: Box<Ast>,
        column: usize,
    },
}

pub struct Parser<'s> {
    tokens: Vec<Spanned>,
    pos: usize,
    depth: usize,
    chars: &'s [char],
}

impl<'s> Parser<'s> {
    pub fn new(tokens: Vec<Spanned>, chars: &'s [char]) -> Parser<'s> {
        Parser {
            tokens,
            pos: 0,
            depth: 0,
            chars,
        }
    }

    pub fn peek(&self) -> &Spanned {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    pub fn advance(&mut self) -> Spanned {
        let t = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    pub fn error(&self, expected: &str) -> ParseError {
        let t = self.peek();
        ParseError::new(t.column, expected, &t.tok.describe())
    }

    pub fn eat(&mut self, tok: &Tok) -> bool {
        if &self.peek().tok == tok {
            self.advance();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: Tok) -> Result<Spanned, ParseError> {
        if self.peek().tok == tok {
            Ok(self.advance())
        } else {
            Err(self.error(&tok.describe()))
        }
    }

    /// One level deeper, refused past [`MAX_DEPTH`]: evaluating and dropping a tree recurse
    /// through it, so outside input must not make it deeper.
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

    /// A source path: `'/' item ('/' item)*`, item `*` or a name. Returned as written,
    /// without the spaces edgeHub's grammar allows between the parts.
    pub fn path(&mut self) -> Result<String, ParseError> {
        let mut path = String::new();
        if self.peek().tok != Tok::Slash {
            return Err(self.error("a source path such as /messages/*"));
        }
        while self.eat(&Tok::Slash) {
            path.push('/');
            match self.peek().tok.clone() {
                Tok::Star => path.push('*'),
                Tok::Id(name) => path.push_str(&name),
                _ => return Err(self.error("'*' or a name after '/' in the source")),
            }
            self.advance();
        }
        Ok(path)
    }

    /// A whole condition up to a token that cannot continue it.
    pub fn condition(&mut self) -> Result<Ast, ParseError> {
        self.expr(0)
    }

    fn expr(&mut self, min: u8) -> Result<Ast, ParseError> {
        let base = self.depth;
        let mut left = self.unary()?;
        while let Some((op, prec)) = BinOp::of(&self.peek().tok) {
            if prec < min {
                break;
            }
            let column = self.advance().column;
            self.deeper()?;
            let right = self.expr(prec + 1)?;
            left = Ast::Binary {
                op,
                left: Box::new(left),
                right: Box::new(right),
                column,
            };
        }
        self.depth = base;
        Ok(left)
    }

    fn unary(&mut self) -> Result<Ast, ParseError> {
        let column = self.peek().column;
        let make: fn(Box<Ast>, usize) -> Ast = match self.peek().tok {
            Tok::Minus => Ast::Neg,
            Tok::Not => Ast::Not,
            _ => return self.primary(),
        };
        self.advance();
        let base = self.depth;
        self.deeper()?;
        let operand = self.unary()?;
        self.depth = base;
        Ok(make(Box::new(operand), column))
    }

    fn primary(&mut self) -> Result<Ast, ParseError> {
        let start = self.pos;
        let t = self.advance();
        Ok(match t.tok {
            Tok::Number(n) => Ast::Number(n),
            Tok::HexOverflow | Tok::Undefined => Ast::Undefined,
            Tok::Str(s) => Ast::Str(s),
            Tok::True => Ast::Bool(true),
            Tok::False => Ast::Bool(false),
            Tok::Null => Ast::Null,
            Tok::SysProp(text) => Ast::Dollar {
                text,
                column: t.column,
            },
            Tok::LBrace => {
                let inner = self.peek().clone();
                let Tok::SysProp(text) = inner.tok else {
                    return Err(self.error("a $name inside '{ }'"));
                };
                self.advance();
                self.expect(Tok::RBrace)?;
                Ast::Escaped {
                    text,
                    column: inner.column,
                }
            }
            Tok::LParen => {
                let base = self.depth;
                self.deeper()?;
                let e = self.expr(0)?;
                self.expect(Tok::RParen)?;
                self.depth = base;
                e
            }
            Tok::Id(name) => {
                if self.peek().tok != Tok::LParen {
                    return Ok(Ast::Property(name));
                }
                let open = self.advance();
                let base = self.depth;
                self.deeper()?;
                let mut args = Vec::new();
                if !self.eat(&Tok::RParen) {
                    loop {
                        args.push(self.expr(0)?);
                        if self.eat(&Tok::Comma) {
                            continue;
                        }
                        if self.peek().tok == Tok::RParen {
                            break;
                        }
                        return Err(self.error("',' or ')'"));
                    }
                    self.advance();
                }
                self.depth = base;
                let close = self.tokens[self.pos - 1].column;
                let raw_args = self
                    .chars
                    .get(open.column..close.saturating_sub(1).max(open.column))
                    .map(|c| c.iter().collect::<String>())
                    .unwrap_or_default();
                Ast::Call {
                    name,
                    args,
                    raw_args,
                    column: t.column,
                }
            }
            Tok::Unterminated => {
                return Err(ParseError::new(t.column, "a closing quote", "end of input"))
            }
            _ => {
                self.pos = start;
                return Err(self.error("an expression"));
            }
        })
    }
}
