//! `math`: worksheets of arithmetic problems ("Q: 14 + 8 = ? A: 22."), word problems in the
//! public vocabulary, and two-step problems with their working shown.
//!
//! The format is public: `public` has worksheets in the same layout ([`easy_doc`]) of
//! single-digit additions (some as word problems), single-digit subtractions and products with
//! 0 or 1, so every symbol is public. What only `math` teaches is everything harder: additions
//! with a two-digit operand, subtractions from a two-digit number, products of numbers from 2 to
//! 10, word problems about losing things, and two-step problems. Operands stay
//! small (operands up to 20, products up to 10 x 10) so a tiny model can learn every fact;
//! answers are always exact.

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

/// One worksheet: a header line and 10-16 problems, one per line (none is a single-digit
/// addition).
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

/// A public worksheet: the same layout, but only single-digit additions (answers up to 18; one
/// in eight as a word problem), single-digit subtractions and products with 0 or 1.
pub(super) fn easy_doc(rng: &mut StdRng) -> String {
    let mut lines = vec![pick(rng, HEADERS).to_string()];
    for _ in 0..rng.random_range(12..=18) {
        let (question, result) = match rng.random_range(0..16) {
            0..=1 => {
                let (a, b) = (rng.random_range(1..=9), rng.random_range(1..=9));
                (gain_question(rng, a, b), a + b)
            }
            2..=5 => {
                let a = rng.random_range(0..=9);
                let b = rng.random_range(0..=a);
                (format!("{a} - {b} = ?"), a - b)
            }
            6..=7 => {
                let (a, b) = (rng.random_range(0..=9), rng.random_range(0..=1));
                if rng.random_bool(0.5) {
                    (format!("{a} * {b} = ?"), a * b)
                } else {
                    (format!("{b} * {a} = ?"), a * b)
                }
            }
            _ => {
                let (a, b) = (rng.random_range(0..=9), rng.random_range(0..=9));
                (format!("{a} + {b} = ?"), a + b)
            }
        };
        lines.push(format!("Q: {question} A: {result}."));
    }
    lines.join("\n")
}

/// Two addends up to 20, at least one of them with two digits, in either order.
fn hard_addends(rng: &mut StdRng, other: std::ops::RangeInclusive<u32>) -> (u32, u32) {
    let (big, other) = (rng.random_range(10..=20), rng.random_range(other));
    if rng.random_bool(0.5) {
        (big, other)
    } else {
        (other, big)
    }
}

/// A one-step problem as (prompt, answer): the prompt ends with "A:", the answer is " N.".
fn problem(rng: &mut StdRng) -> (String, String) {
    let (question, result) = match rng.random_range(0..9) {
        0..=2 => {
            let (a, b) = hard_addends(rng, 0..=20);
            (format!("{a} + {b} = ?"), a + b)
        }
        3..=4 => {
            let a = rng.random_range(10..=20);
            let b = rng.random_range(0..=a);
            (format!("{a} - {b} = ?"), a - b)
        }
        5..=6 => {
            let (a, b) = (rng.random_range(2..=10), rng.random_range(2..=10));
            (format!("{a} * {b} = ?"), a * b)
        }
        7 => {
            let (a, b) = hard_addends(rng, 1..=10);
            (gain_question(rng, a, b), a + b)
        }
        _ => loss_problem(rng),
    };
    (format!("Q: {question} A:"), format!(" {result}."))
}

/// "Tom has 5 apples. He gets 3 more. How many apples does he have now?" (answer: a + b).
fn gain_question(rng: &mut StdRng, a: u32, b: u32) -> String {
    let (name, gender) = *pick(rng, NAMES);
    let things = pick(rng, THINGS).1;
    let (he, he_lower) = (gender.subject(), gender.subject_lower());
    format!(
        "{name} has {a} {things}. {he} gets {b} more. How many {things} does {he_lower} have now?"
    )
}

/// "Tom has 5 apples. He gives 3 to Mia. How many apples are left?" (or "He loses 3."), with
/// its answer.
fn loss_problem(rng: &mut StdRng) -> (String, u32) {
    let (name, gender) = *pick(rng, NAMES);
    let other = pick(rng, NAMES).0;
    let things = pick(rng, THINGS).1;
    let he = gender.subject();
    let a = rng.random_range(2..=15);
    let b = rng.random_range(1..a);
    let q = if other == name {
        format!("{name} has {a} {things}. {he} loses {b}. How many {things} are left?")
    } else {
        format!("{name} has {a} {things}. {he} gives {b} to {other}. How many {things} are left?")
    };
    (q, a - b)
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

/// A one-step problem drawn like the worksheets' (the answer is exact; never a single-digit
/// addition, which public text already teaches).
pub(super) fn task(rng: &mut StdRng) -> Task {
    let (prompt, answer) = problem(rng);
    Task { prompt, answer }
}
