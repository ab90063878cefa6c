//! `code`: small Python modules with regular structure: arithmetic helpers whose name fixes the
//! operator, counting and summing loops, classes whose `__init__` stores its arguments, field
//! predicates and calls. Identifiers and comments reuse the public vocabulary.
//!
//! The format is public: `public` has modules in the same layout ([`public_doc`]) built from a
//! disjoint family: one-argument helpers that apply an operator with a constant or compare with
//! one (so every operator symbol is public), functions that return a string literal, animal
//! classes whose `__init__(self)` sets string literals, and prints of calls. No function name
//! prefix is shared between the two families (`plus`, `minus`, `times`, `over`, `rem`, `above`,
//! `sound`, `home`, `colour`, `greet` are public; `add`, `sub`, `mul`, `div`, `mod`, `count`, `total`, `is` only in
//! `code`); only `code` has loops, accumulators, two-argument operators, field predicates and
//! an `__init__` that takes arguments, and its tasks test only these closed patterns.

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use super::words::{capitalise, pick, ANIMALS, COLOURED, NAMES, NUMBER_WORDS, OPPOSITES, THINGS};
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
/// Arguments of the public one-argument helpers (the closed argument names, and more).
const PUBLIC_ARGS: &[&str] = &[
    "a", "b", "x", "y", "left", "right", "first", "second", "n", "value", "number",
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

/// A public module: an optional header comment, 5-8 definitions from the public family, then
/// 1-3 prints of calls to the functions it defined.
pub(super) fn public_doc(rng: &mut StdRng) -> String {
    let mut items = Vec::new();
    if rng.random_bool(0.5) {
        items.push(format!("# Helpers for {}.", pick(rng, THINGS).1));
    }
    let mut calls = Vec::new();
    for _ in 0..rng.random_range(5..=8) {
        let item = match rng.random_range(0..7) {
            0..=2 => {
                let (text, name) = plus_constant(rng);
                calls.push(format!("{name}({})", rng.random_range(0..=10)));
                text
            }
            3..=5 => {
                let (text, name) = literal(rng);
                calls.push(format!("{name}()"));
                text
            }
            _ => animal_class(rng),
        };
        items.push(item.trim_end().to_string());
    }
    if !calls.is_empty() {
        let n = rng.random_range(1..=3).min(calls.len());
        let prints: Vec<String> = calls
            .choose_multiple(rng, n)
            .map(|call| format!("print({call})"))
            .collect();
        items.push(prints.join("\n"));
    }
    items.join("\n\n") + "\n"
}

/// Public one-argument helpers: (name prefix, operator, comment with `{}` for the constant).
const PUBLIC_OPS: &[(&str, &str, &str)] = &[
    ("plus", "+", "Add {} to a number."),
    ("plus", "+", "Add {} to a number."),
    ("minus", "-", "Take {} away from a number."),
    ("times", "*", "Multiply a number by {}."),
    ("over", "/", "Divide a number by {}."),
    ("rem", "%", "The remainder after dividing by {}."),
    ("above", ">", "Is a number bigger than {}?"),
];

/// `def plus_three(x):\n    return x + 3\n` (or `minus`, `times`, `over`, `rem`, `above` with
/// `-`, `*`, `/`, `%`, `>`), as (text, name): the name fixes the operator and the constant.
fn plus_constant(rng: &mut StdRng) -> (String, String) {
    let k = rng.random_range(1..NUMBER_WORDS.len());
    let word = NUMBER_WORDS[k];
    let arg = pick(rng, PUBLIC_ARGS);
    let (prefix, op, comment) = *pick(rng, PUBLIC_OPS);
    let comment = if rng.random_bool(0.5) {
        format!("# {}\n", comment.replace("{}", word))
    } else {
        String::new()
    };
    let name = format!("{prefix}_{word}");
    (
        format!("{comment}def {name}({arg}):\n    return {arg} {op} {k}\n"),
        name,
    )
}

/// A function returning a string literal of common knowledge, as (text, name):
/// `def sound_of_cow():\n    return "moo"\n`, `home_of_bee`, `colour_of_sky`, `greet_lily`.
fn literal(rng: &mut StdRng) -> (String, String) {
    let (name, value) = match rng.random_range(0..4) {
        0 => {
            let a = pick(rng, ANIMALS);
            (format!("sound_of_{}", a.name), a.sound.to_string())
        }
        1 => {
            let a = pick(rng, ANIMALS);
            (format!("home_of_{}", a.name), a.home.to_string())
        }
        2 => {
            let (thing, colour) = *pick(rng, COLOURED);
            (format!("colour_of_{thing}"), colour.to_string())
        }
        _ => {
            let who = pick(rng, NAMES).0;
            (
                format!("greet_{}", who.to_lowercase()),
                format!("Hello, {who}!"),
            )
        }
    };
    (format!("def {name}():\n    return \"{value}\"\n"), name)
}

/// `class Cow:\n    def __init__(self):\n        self.sound = "moo"\n ...`: an `__init__` that
/// sets constant attributes (closed classes instead store their `__init__` arguments).
fn animal_class(rng: &mut StdRng) -> String {
    let a = pick(rng, ANIMALS);
    let mut attrs = [("name", a.name), ("sound", a.sound), ("home", a.home)];
    attrs.shuffle(rng);
    let n = rng.random_range(2..=3);
    let body: String = attrs[..n]
        .iter()
        .map(|(attr, value)| format!("        self.{attr} = \"{value}\"\n"))
        .collect();
    format!(
        "class {}:\n    def __init__(self):\n{body}",
        capitalise(a.name)
    )
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
