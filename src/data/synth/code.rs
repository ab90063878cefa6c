//! `code`: small Python modules with regular structure: arithmetic helpers whose name fixes the
//! operator, counting and summing loops, and classes whose `__init__` stores its arguments.
//! Identifiers and comments reuse the public vocabulary.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;

use super::words::{capitalise, pick, OPPOSITES, THINGS};
use super::Task;

/// (function prefix, operator, comment verb).
const OPS: &[(&str, &str, &str)] = &[
    ("add", "+", "Add"),
    ("sub", "-", "Subtract"),
    ("mul", "*", "Multiply"),
    ("div", "/", "Divide"),
    ("mod", "%", "Take the remainder of"),
];
const ARG_PAIRS: &[(&str, &str)] = &[
    ("a", "b"),
    ("x", "y"),
    ("left", "right"),
    ("first", "second"),
];
const ACCUMULATORS: &[&str] = &["total", "count", "result", "acc", "n"];
const FIELDS: &[&str] = &[
    "name", "size", "color", "price", "weight", "owner", "age", "speed", "label", "height",
];

/// One module: an optional header comment and 4-7 definitions separated by blank lines.
pub(super) fn doc(rng: &mut StdRng) -> String {
    let mut items = Vec::new();
    if rng.random_bool(0.5) {
        items.push(format!("# Helpers for {}.", pick(rng, THINGS).1));
    }
    for _ in 0..rng.random_range(4..=7) {
        let item = match rng.random_range(0..9) {
            0..=1 => joined(binary_op(rng)),
            2..=4 => Loop::new(rng).text(),
            5..=6 => joined(class_field(rng)),
            7 => predicate(rng),
            _ => usage(rng),
        };
        items.push(item.trim_end().to_string());
    }
    items.join("\n\n") + "\n"
}

/// `def mul_apples(x, y):\n    return x` -> ` * y\n`: the name fixes the operator.
fn binary_op(rng: &mut StdRng) -> (String, String) {
    let (name, op, verb) = *pick(rng, OPS);
    let (a, b) = *pick(rng, ARG_PAIRS);
    let plural = pick(rng, THINGS).1;
    let comment = if rng.random_bool(0.5) {
        format!("# {verb} two numbers.\n")
    } else {
        String::new()
    };
    (
        format!("{comment}def {name}_{plural}({a}, {b}):\n    return {a}"),
        format!(" {op} {b}\n"),
    )
}

/// A counting or summing loop, in the pieces that tasks cut it into.
struct Loop {
    /// `def count_apples(apples):\n    total = 0\n    for apple in`
    head: String,
    /// ` apples:\n` (the loop runs over the argument).
    iterable: String,
    /// `        total += 1\n    return`
    body: String,
    /// ` total\n` (the accumulator is returned).
    ret: String,
}

impl Loop {
    fn new(rng: &mut StdRng) -> Self {
        let (singular, plural) = *pick(rng, THINGS);
        let acc = *pick(rng, ACCUMULATORS);
        let (name, step) = if rng.random_bool(0.5) {
            (format!("count_{plural}"), "1".to_string())
        } else {
            let field = pick(rng, FIELDS);
            (format!("total_{field}"), format!("{singular}.{field}"))
        };
        Loop {
            head: format!("def {name}({plural}):\n    {acc} = 0\n    for {singular} in"),
            iterable: format!(" {plural}:\n"),
            body: format!("        {acc} += {step}\n    return"),
            ret: format!(" {acc}\n"),
        }
    }

    fn text(&self) -> String {
        [&self.head, &self.iterable, &self.body, &self.ret]
            .into_iter()
            .map(String::as_str)
            .collect()
    }
}

/// A class cut at its last `self.<field> =` -> ` <field>\n`: `__init__` stores its arguments.
fn class_field(rng: &mut StdRng) -> (String, String) {
    let singular = pick(rng, THINGS).0;
    let n_fields = rng.random_range(2..=3);
    let fields: Vec<&str> = FIELDS.choose_multiple(rng, n_fields).copied().collect();
    let mut prompt = format!(
        "class {}:\n    def __init__(self, {}):",
        capitalise(singular),
        fields.join(", ")
    );
    for (i, field) in fields.iter().enumerate() {
        prompt += &format!("\n        self.{field} =");
        if i + 1 < fields.len() {
            prompt += &format!(" {field}");
        }
    }
    let last = fields[fields.len() - 1];
    (prompt, format!(" {last}\n"))
}

/// `def is_big(box):\n    return box.size > 7\n` (not a task: the threshold is arbitrary).
fn predicate(rng: &mut StdRng) -> String {
    let (adj, _) = *pick(rng, OPPOSITES);
    let singular = pick(rng, THINGS).0;
    let field = pick(rng, FIELDS);
    let k = rng.random_range(1..=20);
    format!("def is_{adj}({singular}):\n    return {singular}.{field} > {k}\n")
}

/// `result = add_apples(3, 4)\nprint(result)\n`.
fn usage(rng: &mut StdRng) -> String {
    let (name, _, _) = *pick(rng, OPS);
    let plural = pick(rng, THINGS).1;
    let (a, b) = (rng.random_range(1..=20), rng.random_range(1..=20));
    format!("result = {name}_{plural}({a}, {b})\nprint(result)\n")
}

/// A pattern's full text as it appears in modules.
fn joined((prompt, answer): (String, String)) -> String {
    prompt + &answer
}

/// A completion the code patterns determine.
pub(super) fn task(rng: &mut StdRng) -> Task {
    let (prompt, answer) = match rng.random_range(0..4) {
        0 => binary_op(rng),
        1 => {
            let l = Loop::new(rng);
            (l.head + &l.iterable + &l.body, l.ret)
        }
        2 => {
            let l = Loop::new(rng);
            (l.head, l.iterable)
        }
        _ => class_field(rng),
    };
    Task { prompt, answer }
}
