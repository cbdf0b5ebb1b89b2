//! Limits on rendering an untrusted Jinja chat template (it is code from a
//! model folder). One render of the template may take at most:
//! - [`FUEL`] VM steps (minijinja's `fuel`): a real template spends a few
//!   dozen per message, so a conversation of thousands of messages fits,
//!   while nested loops stop in well under a second;
//! - [`RECURSION`] levels of minijinja's recursion counter (a macro call
//!   counts 4, so about 50 nested macro calls; real templates nest a few to
//!   render tool schemas);
//! - [`MAX_OUTPUT`] bytes of output, written into a writer that refuses more;
//! - [`MAX_VALUE`] bytes for any string (and [`MAX_ITEMS`] items for any
//!   list) built by `+`, `~`, `*`, a filter or a call: before compiling, each
//!   such expression is wrapped in a check of its result, so a value that
//!   doubles in a loop stops at twice the cap instead of filling memory.
//!   minijinja itself refuses `string * n` past 100 MB before allocating it.
//!
//! A template that hits a limit fails with one sentence naming where it came
//! from and what it hit. The caps are far above any real record (the
//! largest fixture conversation renders to a few KB).

use minijinja::machinery::ast::{CallArg, Expr, Stmt};
use minijinja::machinery::{parse, WhitespaceConfig};
use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// VM steps per render.
pub const FUEL: u64 = 5_000_000;
/// minijinja recursion depth per render (macro calls count 4 each).
pub const RECURSION: usize = 200;
/// Bytes of rendered output per render.
pub const MAX_OUTPUT: usize = 64 << 20;
/// Bytes of any one string value built while rendering.
pub const MAX_VALUE: usize = 32 << 20;
/// Items of any one list value built while rendering.
pub const MAX_ITEMS: usize = 1 << 20;

/// The function each value-building expression is wrapped in.
pub const BOUNDED_FN: &str = "__llmft_bounded";

const VALUE_TOO_LARGE: &str = "__llmft: value too large";
const RECURSION_EXCEEDED: &str = "recursion limit exceeded";
const REPEAT_TOO_LARGE: &str = "repeated string is too large";

/// `value` unchanged, or an error when it is over [`MAX_VALUE`] bytes or
/// [`MAX_ITEMS`] items.
pub fn bounded(value: Value) -> Result<Value, Error> {
    let too_large = match value.as_str() {
        Some(s) => s.len() > MAX_VALUE,
        None => {
            matches!(
                value.kind(),
                ValueKind::Seq | ValueKind::Iterable | ValueKind::Map
            ) && value.len().is_some_and(|n| n > MAX_ITEMS)
        }
    };
    if too_large {
        return Err(Error::new(ErrorKind::InvalidOperation, VALUE_TOO_LARGE));
    }
    Ok(value)
}

/// `source` with every `+`, `~` and `*` expression, filter and call wrapped
/// in `__llmft_bounded(…)`; the rest of the text is unchanged. A template
/// that does not parse is returned as is (compiling it reports the error).
pub fn wrap_value_builders(source: &str) -> String {
    let ws = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    let Ok(ast) = parse(source, "chat_template", Default::default(), ws) else {
        return source.to_string();
    };
    let mut spans = Vec::new();
    stmt(&ast, &mut spans, source);
    // (offset, is_open, span length): at one offset closes come first, then
    // opens from the longest span to the shortest; closes go shortest first.
    let mut marks: Vec<(usize, bool, usize)> = Vec::with_capacity(spans.len() * 2);
    for (start, end) in spans {
        marks.push((start, true, end - start));
        marks.push((end, false, end - start));
    }
    marks.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.cmp(&b.1))
            .then(if a.1 { b.2.cmp(&a.2) } else { a.2.cmp(&b.2) })
    });
    let mut out = String::with_capacity(source.len() + marks.len() * 12);
    let mut copied = 0;
    for (at, open, _) in marks {
        out.push_str(&source[copied..at]);
        copied = at;
        if open {
            out.push_str(BOUNDED_FN);
            out.push('(');
        } else {
            out.push(')');
        }
    }
    out.push_str(&source[copied..]);
    out
}

fn stmts(list: &[Stmt], spans: &mut Vec<(usize, usize)>, src: &str) {
    for s in list {
        stmt(s, spans, src);
    }
}

fn stmt(s: &Stmt, spans: &mut Vec<(usize, usize)>, src: &str) {
    let e = |x: &Expr, spans: &mut Vec<(usize, usize)>| {
        expr(x, spans, src);
    };
    match s {
        Stmt::Template(t) => stmts(&t.children, spans, src),
        Stmt::EmitExpr(x) => e(&x.expr, spans),
        Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
        Stmt::ForLoop(f) => {
            e(&f.iter, spans);
            if let Some(x) = &f.filter_expr {
                e(x, spans);
            }
            stmts(&f.body, spans, src);
            stmts(&f.else_body, spans, src);
        }
        Stmt::IfCond(i) => {
            e(&i.expr, spans);
            stmts(&i.true_body, spans, src);
            stmts(&i.false_body, spans, src);
        }
        Stmt::WithBlock(w) => {
            for (_, x) in &w.assignments {
                e(x, spans);
            }
            stmts(&w.body, spans, src);
        }
        Stmt::Set(s) => e(&s.expr, spans),
        Stmt::SetBlock(s) => stmts(&s.body, spans, src),
        Stmt::AutoEscape(a) => stmts(&a.body, spans, src),
        Stmt::FilterBlock(f) => stmts(&f.body, spans, src),
        Stmt::Block(b) => stmts(&b.body, spans, src),
        Stmt::Import(_) | Stmt::FromImport(_) | Stmt::Extends(_) | Stmt::Include(_) => {}
        Stmt::Macro(m) => {
            for x in &m.defaults {
                e(x, spans);
            }
            stmts(&m.body, spans, src);
        }
        Stmt::CallBlock(c) => {
            e(&c.call.expr, spans);
            args(&c.call.args, spans, src);
            stmts(&c.macro_decl.body, spans, src);
        }
        Stmt::Do(d) => {
            e(&d.call.expr, spans);
            args(&d.call.args, spans, src);
        }
    }
}

/// The byte range a call's arguments add to an expression's extent.
fn args(list: &[CallArg], spans: &mut Vec<(usize, usize)>, src: &str) -> Option<(usize, usize)> {
    let mut ext = None;
    for a in list {
        match a {
            CallArg::Pos(x)
            | CallArg::Kwarg(_, x)
            | CallArg::PosSplat(x)
            | CallArg::KwargSplat(x) => {
                ext = union(ext, Some(expr(x, spans, src)));
            }
        }
    }
    ext
}

fn union(a: Option<(usize, usize)>, b: Option<(usize, usize)>) -> Option<(usize, usize)> {
    match (a, b) {
        (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Push the spans to wrap inside `e`; `e`'s extent in the source. A node's
/// own span can start at its last postfix or filter name, so the extent is
/// the union with its children, widened to the parentheses it closes.
fn expr(e: &Expr, spans: &mut Vec<(usize, usize)>, src: &str) -> (usize, usize) {
    use minijinja::machinery::ast::BinOpKind;
    let own = |span: minijinja::machinery::Span| {
        Some((span.start_offset as usize, span.end_offset as usize))
    };
    let sub = |x: &Expr, spans: &mut Vec<(usize, usize)>| Some(expr(x, spans, src));
    let (own_span, children, wrap) = match e {
        Expr::Var(v) => (own(v.span()), None, false),
        Expr::Const(c) => (own(c.span()), None, false),
        Expr::Slice(s) => {
            let mut ext = sub(&s.expr, spans);
            for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                ext = union(ext, sub(x, spans));
            }
            (own(s.span()), ext, false)
        }
        Expr::UnaryOp(u) => (own(u.span()), sub(&u.expr, spans), false),
        Expr::BinOp(b) => {
            let ext = union(sub(&b.left, spans), sub(&b.right, spans));
            let wrap = matches!(b.op, BinOpKind::Add | BinOpKind::Concat | BinOpKind::Mul);
            (own(b.span()), ext, wrap)
        }
        Expr::Compare(c) => {
            let mut ext = sub(&c.expr, spans);
            for op in &c.ops {
                ext = union(ext, sub(&op.expr, spans));
            }
            (own(c.span()), ext, false)
        }
        Expr::IfExpr(i) => {
            let mut ext = union(sub(&i.test_expr, spans), sub(&i.true_expr, spans));
            if let Some(x) = &i.false_expr {
                ext = union(ext, sub(x, spans));
            }
            (own(i.span()), ext, false)
        }
        Expr::Filter(f) => {
            let ext = f.expr.as_ref().and_then(|x| sub(x, spans));
            let ext = union(ext, args(&f.args, spans, src));
            (own(f.span()), ext, f.expr.is_some())
        }
        Expr::Test(t) => {
            let ext = union(sub(&t.expr, spans), args(&t.args, spans, src));
            (own(t.span()), ext, false)
        }
        Expr::GetAttr(g) => (own(g.span()), sub(&g.expr, spans), false),
        Expr::GetItem(g) => {
            let ext = union(sub(&g.expr, spans), sub(&g.subscript_expr, spans));
            (own(g.span()), ext, false)
        }
        Expr::Call(c) => {
            // `loop(…)` (recursive loops) and `super()` are compiled
            // specially; they only re-run template code, which fuel bounds.
            let special = matches!(&c.expr, Expr::Var(v) if v.id == "loop" || v.id == "super");
            let ext = union(sub(&c.expr, spans), args(&c.args, spans, src));
            (own(c.span()), ext, !special)
        }
        Expr::List(l) => {
            let mut ext = None;
            for x in &l.items {
                ext = union(ext, sub(x, spans));
            }
            (own(l.span()), ext, false)
        }
        Expr::Map(m) => {
            let mut ext = None;
            for x in m.keys.iter().chain(&m.values) {
                ext = union(ext, sub(x, spans));
            }
            (own(m.span()), ext, false)
        }
    };
    let (mut start, end) = union(own_span, children).expect("a node has a span");
    // Widen over `(` … `)` pairs whose `)` lies inside the extent.
    let mut open = unmatched_closes(&src[start..end]);
    while open > 0 {
        let before = src[..start].trim_end();
        if !before.ends_with('(') {
            break;
        }
        start = before.len() - 1;
        open -= 1;
    }
    if wrap {
        spans.push((start, end));
    }
    (start, end)
}

/// How many `)` in `text` (outside string literals) have no `(` before them.
fn unmatched_closes(text: &str) -> usize {
    let (mut depth, mut unmatched) = (0usize, 0usize);
    let mut quote = None;
    let mut escaped = false;
    for c in text.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' => depth += 1,
            ')' if depth == 0 => unmatched += 1,
            ')' => depth -= 1,
            _ => {}
        }
    }
    unmatched
}

/// A writer that takes at most [`MAX_OUTPUT`] bytes.
#[derive(Default)]
pub struct CappedWriter {
    /// What was written.
    pub buf: Vec<u8>,
    /// Whether a write was refused.
    pub overflowed: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The limit a render error (or an overflowed writer) hit, as the end of a
/// sentence that starts with the template's name; `None` when the error is
/// not about a limit.
pub fn limit_hit(e: &Error, overflowed: bool) -> Option<String> {
    const WHY: &str = "llmft bounds untrusted templates";
    if overflowed {
        return Some(format!(
            "stopped after {} MiB of output (it writes too much; {WHY})",
            MAX_OUTPUT >> 20
        ));
    }
    match (e.kind(), e.detail()) {
        (ErrorKind::OutOfFuel, _) => Some(format!(
            "stopped after {FUEL} steps (it loops too long; {WHY})"
        )),
        (ErrorKind::InvalidOperation, Some(RECURSION_EXCEEDED)) => Some(format!(
            "stopped at recursion depth {RECURSION} (macros or includes nest too deep; {WHY})"
        )),
        (ErrorKind::InvalidOperation, Some(VALUE_TOO_LARGE)) => Some(format!(
            "stopped building a value over {} MiB or {MAX_ITEMS} items ({WHY})",
            MAX_VALUE >> 20
        )),
        (ErrorKind::InvalidOperation, Some(REPEAT_TOO_LARGE)) => {
            Some(format!("stopped repeating a string past 100 MB ({WHY})"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str) -> String {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(BOUNDED_FN, bounded);
        env.add_template_owned("t", source.to_string()).unwrap();
        env.get_template("t")
            .unwrap()
            .render(minijinja::context! { xs => ["a", "b)"], n => 2 })
            .unwrap()
    }

    #[test]
    fn wrapping_keeps_what_a_template_renders() {
        for src in [
            "{{ (xs[0])|upper }}{{ (xs[0] ~ xs[1])|upper ~ '(' }}{{ ( ( n ) ) * 3 }}",
            "{{ xs|join(', ')|length + n }}{{ 'x)('.upper().lower()[1:] ~ xs[1] }}",
            "{% set ns = namespace(s='') %}{% for x in xs if x != 'z' %}{% set ns.s = ns.s + x %}{% endfor %}{{ ns.s }}",
            "{% macro m(a, b=n * 2) %}{{ a ~ b }}{{ caller() if caller is defined }}{% endmacro %}{{ m('q') }}{% call m(1) %}c{% endcall %}",
            "{% filter upper %}{{ xs|map('upper')|list }}{% endfilter %}{{ [1] * n }}{{ {'k': 'v' ~ n}['k'] }}",
            "{% for x in xs recursive %}{{ x }}{% endfor %}{{ -n + 1 if n is number else 0 }}",
        ] {
            let wrapped = wrap_value_builders(src);
            assert!(wrapped.contains(BOUNDED_FN), "{wrapped}");
            assert_eq!(render(&wrapped), render(src), "{wrapped}");
        }
    }
}
