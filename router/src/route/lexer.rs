//! Tokens of edgeHub's route language, cut the way its ANTLR lexer cuts them: at each point
//! the longest token wins, and of equally long ones the rule listed first in edgeHub's grammar.
//! That is why `a-b` is one property name (names may hold `-`, `.`, `!`, `'`, `|`, `*`), why
//! `3 -4` is two numbers, why `true` is a literal while `True` is a property, and why
//! `$body.a[0]` is one token. Matching edgeHub here is what makes a route from an IoT Edge
//! deployment mean the same thing on fleethub.

use crate::condition::ParseError;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    LBrace,
    RBrace,
    Select,
    From,
    Where,
    Into,
    /// A quoted string, escapes resolved.
    Str(String),
    /// A string with no closing quote (an error wherever it appears).
    Unterminated,
    /// A number as written: decimal (possibly with a sign), real, or `0x…`.
    Number(f64),
    /// A hexadecimal literal too large for edgeHub's 64-bit integers: undefined.
    HexOverflow,
    True,
    False,
    Null,
    Undefined,
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    And,
    Or,
    Not,
    Eq,
    Ne,
    Le,
    Ge,
    Gt,
    Lt,
    Concat,
    Coalesce,
    /// `$name`, `$body.a.b[0]`: as written.
    SysProp(String),
    /// A property or function name, or a path item: as written.
    Id(String),
    /// A run that is neither (`a[0]`): never valid, kept to say so.
    QueryPath(String),
    Unknown(char),
    End,
}

impl Tok {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Tok::LBrace => "'{'".into(),
            Tok::RBrace => "'}'".into(),
            Tok::Select => "SELECT".into(),
            Tok::From => "FROM".into(),
            Tok::Where => "WHERE".into(),
            Tok::Into => "INTO".into(),
            Tok::Str(s) => format!("string '{s}'"),
            Tok::Unterminated => "a string with no closing quote".into(),
            Tok::Number(n) => format!("number {n}"),
            Tok::HexOverflow => "a hexadecimal number too large".into(),
            Tok::True => "'true'".into(),
            Tok::False => "'false'".into(),
            Tok::Null => "'null'".into(),
            Tok::Undefined => "'undefined'".into(),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::Comma => "','".into(),
            Tok::Plus => "'+'".into(),
            Tok::Minus => "'-'".into(),
            Tok::Star => "'*'".into(),
            Tok::Slash => "'/'".into(),
            Tok::Percent => "'%'".into(),
            Tok::And => "AND".into(),
            Tok::Or => "OR".into(),
            Tok::Not => "NOT".into(),
            Tok::Eq => "'='".into(),
            Tok::Ne => "'!='".into(),
            Tok::Le => "'<='".into(),
            Tok::Ge => "'>='".into(),
            Tok::Gt => "'>'".into(),
            Tok::Lt => "'<'".into(),
            Tok::Concat => "'||'".into(),
            Tok::Coalesce => "'??'".into(),
            Tok::SysProp(s) | Tok::Id(s) | Tok::QueryPath(s) => format!("'{s}'"),
            Tok::Unknown(c) => format!("'{c}'"),
            Tok::End => "end of input".into(),
        }
    }
}

/// A token and the 1-based column (in characters) where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    pub tok: Tok,
    pub column: usize,
}

/// Characters that end a name: what edgeHub's `ID_CHARS` leaves out.
fn id_char(c: char) -> bool {
    !matches!(
        c,
        '(' | ')'
            | '<'
            | '>'
            | '@'
            | ','
            | ';'
            | ':'
            | '\\'
            | '"'
            | '/'
            | '['
            | ']'
            | '?'
            | '='
            | '{'
            | '}'
            | ' '
            | '\t'
            | '\n'
            | '\r'
    )
}

/// `QUERY_PATH_CHARS`: a name's characters plus `[` and `]`.
fn path_char(c: char) -> bool {
    id_char(c) || c == '[' || c == ']'
}

fn run(chars: &[char], at: usize, ok: impl Fn(char) -> bool) -> usize {
    chars[at..].iter().take_while(|c| ok(**c)).count()
}

fn fixed(chars: &[char], at: usize, text: &str, any_case: bool) -> usize {
    let n = text.chars().count();
    if at + n > chars.len() {
        return 0;
    }
    let same = chars[at..at + n].iter().zip(text.chars()).all(|(a, b)| {
        if any_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            *a == b
        }
    });
    if same {
        n
    } else {
        0
    }
}

/// A quoted string from `at`: `(closed, length, value)`; `None` when a backslash starts no
/// escape edgeHub knows (`\"`, `\'`, `\\`, `\uXXXX`), which ends even the unterminated form.
fn string(chars: &[char], at: usize) -> (bool, usize, String) {
    let quote = chars[at];
    let mut units: Vec<u16> = Vec::new();
    let mut i = at + 1;
    let push = |units: &mut Vec<u16>, c: char| {
        let mut buf = [0u16; 2];
        units.extend_from_slice(c.encode_utf16(&mut buf));
    };
    loop {
        match chars.get(i) {
            None => return (false, i - at, String::from_utf16_lossy(&units)),
            Some(&c) if c == quote => return (true, i + 1 - at, String::from_utf16_lossy(&units)),
            Some('\\') => match chars.get(i + 1) {
                Some(&e @ ('"' | '\'' | '\\')) => {
                    push(&mut units, e);
                    i += 2;
                }
                Some('u') => {
                    let hex: String = chars.iter().skip(i + 2).take(4).collect();
                    match (hex.len() == 4)
                        .then(|| u16::from_str_radix(&hex, 16).ok())
                        .flatten()
                    {
                        Some(unit) if hex.chars().all(|h| h.is_ascii_hexdigit()) => {
                            units.push(unit);
                            i += 6;
                        }
                        _ => return (false, i - at, String::from_utf16_lossy(&units)),
                    }
                }
                _ => return (false, i - at, String::from_utf16_lossy(&units)),
            },
            Some(&c) => {
                push(&mut units, c);
                i += 1;
            }
        }
    }
}

fn digits(chars: &[char], at: usize) -> usize {
    run(chars, at, |c| c.is_ascii_digit())
}

/// `[Ee] [+-]? [0-9]+` from `at`.
fn exponent(chars: &[char], at: usize) -> usize {
    if !matches!(chars.get(at), Some('e' | 'E')) {
        return 0;
    }
    let sign = usize::from(matches!(chars.get(at + 1), Some('+' | '-')));
    match digits(chars, at + 1 + sign) {
        0 => 0,
        n => 1 + sign + n,
    }
}

/// `INTEGER_LITERAL`: `-? [0-9]+`.
fn integer(chars: &[char], at: usize) -> usize {
    let sign = usize::from(chars.get(at) == Some(&'-'));
    match digits(chars, at + sign) {
        0 => 0,
        n => sign + n,
    }
}

/// `REAL_LITERAL`: `-? [0-9]* '.' [0-9]+ EXP?` or `-? [0-9]* EXP`.
fn real(chars: &[char], at: usize) -> usize {
    let sign = usize::from(chars.get(at) == Some(&'-'));
    let whole = digits(chars, at + sign);
    let mut best = 0;
    let dot = at + sign + whole;
    if chars.get(dot) == Some(&'.') {
        let fraction = digits(chars, dot + 1);
        if fraction > 0 {
            let end = dot + 1 + fraction;
            best = end + exponent(chars, end) - at;
        }
    }
    let exp = exponent(chars, at + sign + whole);
    if exp > 0 {
        best = best.max(sign + whole + exp);
    }
    best
}

/// `HEX_INTEGER_LITERAL`: `0 [Xx] [0-9a-fA-F]+`.
fn hex(chars: &[char], at: usize) -> usize {
    if chars.get(at) != Some(&'0') || !matches!(chars.get(at + 1), Some('x' | 'X')) {
        return 0;
    }
    match run(chars, at + 2, |c| c.is_ascii_hexdigit()) {
        0 => 0,
        n => 2 + n,
    }
}

/// `/* … */`, only when it is closed. `close` is where the first `*/` at or after each
/// position starts (computed once per text, so a text full of `/*` stays linear).
fn comment(chars: &[char], at: usize, close: &[usize]) -> usize {
    if fixed(chars, at, "/*", false) == 0 {
        return 0;
    }
    match close.get(at + 2) {
        Some(&c) if c < chars.len() => c + 2 - at,
        _ => 0,
    }
}

/// For each position, where the next `*/` starts (`chars.len()` when there is none).
fn closings(chars: &[char]) -> Vec<usize> {
    let mut next = vec![chars.len(); chars.len() + 1];
    for i in (0..chars.len().saturating_sub(1)).rev() {
        next[i] = if chars[i] == '*' && chars[i + 1] == '/' {
            i
        } else {
            next[i + 1]
        };
    }
    next
}

/// The rules in edgeHub's order (ties go to the earlier), each with its match length at `at`.
#[derive(Clone, Copy, PartialEq)]
enum Rule {
    Fixed(&'static str, bool),
    Str,
    Unterminated,
    Integer,
    Hex,
    Real,
    SysProp,
    Id,
    QueryPath,
    Space,
    Comment,
}

/// A fixed token's constructor.
type Make = Option<fn() -> Tok>;

const RULES: &[(Rule, Make)] = &[
    (Rule::Fixed("{", false), Some(|| Tok::LBrace)),
    (Rule::Fixed("}", false), Some(|| Tok::RBrace)),
    (Rule::Fixed("select", true), Some(|| Tok::Select)),
    (Rule::Fixed("from", true), Some(|| Tok::From)),
    (Rule::Fixed("where", true), Some(|| Tok::Where)),
    (Rule::Fixed("into", true), Some(|| Tok::Into)),
    (Rule::Str, None),
    (Rule::Unterminated, None),
    (Rule::Integer, None),
    (Rule::Hex, None),
    (Rule::Real, None),
    (Rule::Fixed("true", false), Some(|| Tok::True)),
    (Rule::Fixed("false", false), Some(|| Tok::False)),
    (Rule::Fixed("null", false), Some(|| Tok::Null)),
    (Rule::Fixed("undefined", false), Some(|| Tok::Undefined)),
    (Rule::Fixed("(", false), Some(|| Tok::LParen)),
    (Rule::Fixed(")", false), Some(|| Tok::RParen)),
    (Rule::Fixed(",", false), Some(|| Tok::Comma)),
    (Rule::Fixed("+", false), Some(|| Tok::Plus)),
    (Rule::Fixed("-", false), Some(|| Tok::Minus)),
    (Rule::Fixed("*", false), Some(|| Tok::Star)),
    (Rule::Fixed("/", false), Some(|| Tok::Slash)),
    (Rule::Fixed("%", false), Some(|| Tok::Percent)),
    (Rule::Fixed("and", true), Some(|| Tok::And)),
    (Rule::Fixed("or", true), Some(|| Tok::Or)),
    (Rule::Fixed("not", true), Some(|| Tok::Not)),
    (Rule::Fixed("=", false), Some(|| Tok::Eq)),
    (Rule::Fixed("!=", false), Some(|| Tok::Ne)),
    (Rule::Fixed("<>", false), Some(|| Tok::Ne)),
    (Rule::Fixed("<=", false), Some(|| Tok::Le)),
    (Rule::Fixed(">=", false), Some(|| Tok::Ge)),
    (Rule::Fixed(">", false), Some(|| Tok::Gt)),
    (Rule::Fixed("<", false), Some(|| Tok::Lt)),
    (Rule::Fixed("||", false), Some(|| Tok::Concat)),
    (Rule::Fixed("??", false), Some(|| Tok::Coalesce)),
    (Rule::SysProp, None),
    (Rule::Id, None),
    (Rule::QueryPath, None),
    (Rule::Space, None),
    (Rule::Comment, None),
];

fn length(rule: Rule, chars: &[char], at: usize, close: &[usize]) -> usize {
    match rule {
        Rule::Fixed(text, any_case) => fixed(chars, at, text, any_case),
        Rule::Str | Rule::Unterminated => {
            if !matches!(chars[at], '"' | '\'') {
                return 0;
            }
            let (closed, n, _) = string(chars, at);
            match (rule, closed) {
                (Rule::Str, true) | (Rule::Unterminated, false) => n,
                // A closed string is also an unterminated one a quote shorter.
                (Rule::Unterminated, true) => n - 1,
                _ => 0,
            }
        }
        Rule::Integer => integer(chars, at),
        Rule::Hex => hex(chars, at),
        Rule::Real => real(chars, at),
        Rule::SysProp => {
            if chars[at] != '$' {
                return 0;
            }
            match run(chars, at + 1, path_char) {
                0 => 0,
                n => n + 1,
            }
        }
        Rule::Id => run(chars, at, id_char),
        Rule::QueryPath => run(chars, at, path_char),
        Rule::Space => run(chars, at, |c| matches!(c, ' ' | '\t' | '\r' | '\n')),
        Rule::Comment => comment(chars, at, close),
    }
}

pub fn lex(src: &str) -> Result<Vec<Spanned>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let close = closings(&chars);
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let column = i + 1;
        let mut best: Option<(usize, usize)> = None;
        for (index, (rule, _)) in RULES.iter().enumerate() {
            let n = length(*rule, &chars, i, &close);
            if n > 0 && best.is_none_or(|(_, b)| n > b) {
                best = Some((index, n));
            }
        }
        let Some((index, n)) = best else {
            out.push(Spanned {
                tok: Tok::Unknown(chars[i]),
                column,
            });
            i += 1;
            continue;
        };
        let text: String = chars[i..i + n].iter().collect();
        let tok = match RULES[index] {
            (_, Some(make)) => Some(make()),
            (Rule::Str, _) => Some(Tok::Str(string(&chars, i).2)),
            (Rule::Unterminated, _) => Some(Tok::Unterminated),
            (Rule::Integer | Rule::Real, _) => Some(match text.parse::<f64>() {
                Ok(v) => Tok::Number(v),
                Err(_) => Tok::Unknown(chars[i]),
            }),
            (Rule::Hex, _) => Some(match i64::from_str_radix(&text[2..], 16) {
                Ok(v) => Tok::Number(v as f64),
                Err(_) => Tok::HexOverflow,
            }),
            (Rule::SysProp, _) => Some(Tok::SysProp(text)),
            (Rule::Id, _) => Some(Tok::Id(text)),
            (Rule::QueryPath, _) => Some(Tok::QueryPath(text)),
            (Rule::Space | Rule::Comment, _) => None,
            (Rule::Fixed(..), None) => None,
        };
        if let Some(tok) = tok {
            out.push(Spanned { tok, column });
        }
        i += n;
    }
    out.push(Spanned {
        tok: Tok::End,
        column: chars.len() + 1,
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        lex(s).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn the_longest_token_wins_and_ties_go_to_the_earlier_rule() {
        use Tok::*;
        assert_eq!(toks("a-b"), [Id("a-b".into()), End]);
        assert_eq!(toks("3 -4"), [Number(3.0), Number(-4.0), End]);
        assert_eq!(toks("3 - 4"), [Number(3.0), Minus, Number(4.0), End]);
        assert_eq!(toks("3-4"), [Id("3-4".into()), End]);
        assert_eq!(toks("true True"), [True, Id("True".into()), End]);
        assert_eq!(toks("AND android"), [And, Id("android".into()), End]);
        assert_eq!(toks("$body.a[0]"), [SysProp("$body.a[0]".into()), End]);
        assert_eq!(toks("a[0]"), [QueryPath("a[0]".into()), End]);
        assert_eq!(
            toks("0x1F 1.5e1 .5 1e3"),
            [Number(31.0), Number(15.0), Number(0.5), Number(1000.0), End]
        );
        assert_eq!(toks("a!=b"), [Id("a!".into()), Eq, Id("b".into()), End]);
        assert_eq!(
            toks("'a' || 'b' ?? x"),
            [
                Str("a".into()),
                Concat,
                Str("b".into()),
                Coalesce,
                Id("x".into()),
                End
            ]
        );
        assert_eq!(
            toks("{ $sys }"),
            [LBrace, SysProp("$sys".into()), RBrace, End]
        );
        assert_eq!(toks("/* note */ x"), [Id("x".into()), End]);
        assert_eq!(toks("FROM /*"), [From, Slash, Star, End]);
        assert_eq!(toks("/*/ x */y"), [Id("y".into()), End]);
        assert_eq!(toks("/**/"), [End]);
        assert_eq!(toks(r#""a\"b\u00FC\\""#), [Str("a\"bü\\".into()), End]);
        assert_eq!(toks("'abc"), [Unterminated, End]);
        assert_eq!(toks("0xFFFFFFFFFFFFFFFFFF"), [HexOverflow, End]);
        assert_eq!(toks("10e1000"), [Number(f64::INFINITY), End]);
    }
}

#[cfg(test)]
mod scale {
    use super::*;

    /// Long adversarial texts lex in linear time (the API takes bodies of megabytes).
    #[test]
    fn long_texts_of_openers_quotes_and_names_lex_quickly() {
        let started = std::time::Instant::now();
        for text in [
            "/*".repeat(200_000),
            "/".repeat(400_000),
            "'".repeat(400_000),
            "\"a".repeat(200_000),
            "a".repeat(400_000),
            "$".repeat(400_000),
            "1.".repeat(200_000),
            "'\\x".repeat(100_000),
        ] {
            let _ = lex(&text);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
