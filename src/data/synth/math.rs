//! `math`: worksheets of small arithmetic problems ("Q: 7 + 8 = ? A: 15."), word problems in
//! the public vocabulary, and two-step problems with their working shown.
//!
//! Operands stay small (sums of numbers up to 20, products up to 10 x 10) so a tiny model can
//! learn every fact; answers are always exact.

use rand::rngs::StdRng;
use rand::Rng;

use super::words::{pick, NAMES, THINGS};
use super::Task;

const HEADERS: &[&str] = &[
    "Math practice.",
    "Let us solve some problems.",
    "Arithmetic drill.",
    "Homework: find each answer.",
];

/// One worksheet: a header line and 10-16 problems, one per line.
pub(super) fn doc(rng: &mut StdRng) -> String {
    let mut lines = vec![pick(rng, HEADERS).to_string()];
    for _ in 0..rng.random_range(10..=16) {
        let line = match rng.random_range(0..10) {
            0 => two_step(rng),
            _ => {
                let (prompt, answer) = problem(rng);
                prompt + &answer
            }
        };
        lines.push(line);
    }
    lines.join("\n")
}

/// A one-step problem as (prompt, answer): the prompt ends with "A:", the answer is " N.".
fn problem(rng: &mut StdRng) -> (String, String) {
    let (question, result) = match rng.random_range(0..9) {
        0..=2 => {
            let (a, b) = (rng.random_range(0..=20), rng.random_range(0..=20));
            (format!("{a} + {b} = ?"), a + b)
        }
        3..=4 => {
            let a = rng.random_range(0..=20);
            let b = rng.random_range(0..=a);
            (format!("{a} - {b} = ?"), a - b)
        }
        5..=6 => {
            let (a, b) = (rng.random_range(1..=10), rng.random_range(1..=10));
            (format!("{a} * {b} = ?"), a * b)
        }
        7 => word_problem(rng, true),
        _ => word_problem(rng, false),
    };
    (format!("Q: {question} A:"), format!(" {result}."))
}

/// "Tom has 5 apples. He gets 3 more. ..." (gain) or "... He gives 3 to Mia. ..." (loss).
fn word_problem(rng: &mut StdRng, gain: bool) -> (String, u32) {
    let (name, gender) = *pick(rng, NAMES);
    let other = pick(rng, NAMES).0;
    let things = pick(rng, THINGS).1;
    let (he, he_lower) = (gender.subject(), gender.subject_lower());
    let a = rng.random_range(2..=15);
    if gain {
        let b = rng.random_range(1..=10);
        let q = format!(
            "{name} has {a} {things}. {he} gets {b} more. How many {things} does {he_lower} have now?"
        );
        (q, a + b)
    } else {
        let b = rng.random_range(1..a);
        let q = if other == name {
            format!("{name} has {a} {things}. {he} loses {b}. How many {things} are left?")
        } else {
            format!(
                "{name} has {a} {things}. {he} gives {b} to {other}. How many {things} are left?"
            )
        };
        (q, a - b)
    }
}

/// "Q: 4 + 5 - 2 = ? A: 4 + 5 = 9. 9 - 2 = 7. So the answer is 7."
fn two_step(rng: &mut StdRng) -> String {
    let (a, b) = (rng.random_range(0..=10), rng.random_range(0..=10));
    let s = a + b;
    if rng.random_bool(0.5) {
        let c = rng.random_range(0..=10);
        let r = s + c;
        format!("Q: {a} + {b} + {c} = ? A: {a} + {b} = {s}. {s} + {c} = {r}. So the answer is {r}.")
    } else {
        let c = rng.random_range(0..=s);
        let r = s - c;
        format!("Q: {a} + {b} - {c} = ? A: {a} + {b} = {s}. {s} - {c} = {r}. So the answer is {r}.")
    }
}

/// A one-step problem drawn like the worksheets' (the answer is exact).
pub(super) fn task(rng: &mut StdRng) -> Task {
    let (prompt, answer) = problem(rng);
    Task { prompt, answer }
}
