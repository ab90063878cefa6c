//! `public`: the broad domain, like the web text a real public model is trained on: it covers
//! the general formats and vocabulary of every domain, while what a closed domain adds (its
//! specific knowledge or skill) appears only there.
//!
//! Half of the documents are short stories from a small English grammar, seeded with common
//! knowledge (animal sounds and homes, colours of things, opposites) in fixed phrasings that
//! the public tasks probe; they also mention counts up to 100 as numerals, without arithmetic.
//! The other half are public-grade versions of the closed domains' formats with different
//! content, one sixth of the documents each:
//! - worksheets of single-digit additions, some as word problems (`math` has everything
//!   harder);
//! - encyclopedia entries about the seed's small public world (`facts` describes a disjoint,
//!   larger closed world in the same templates);
//! - Python modules from the public family of functions (`code` has a disjoint family).

use rand::rngs::StdRng;
use rand::Rng;

use super::facts::World;
use super::words::{
    pick, Gender, ANIMALS, COLOURED, COLOURS, NAMES, NUMBER_WORDS, OPPOSITES, PLACES, THINGS,
};
use super::{code, math, Task};

const FEELINGS: &[&str] = &["happy", "sad", "tired", "excited", "scared", "proud"];
const WEATHER: &[&str] = &["sunny", "rainy", "windy", "snowy", "warm"];
const TRAITS: &[&str] = &["little", "kind", "brave", "funny", "curious", "shy"];
const FAMILY: &[&str] = &["mom", "dad", "grandma", "grandpa", "sister", "brother"];

/// The two characters of a story.
struct Cast {
    hero: &'static str,
    gender: Gender,
    friend: &'static str,
}

/// Public document `index`: stories at even indices; the odd ones cycle through an easy math
/// worksheet, entries about `world` (the public one) and a public code module. Every run of six
/// consecutive documents has three stories and one of each other kind.
pub(super) fn doc(index: u64, world: &World, rng: &mut StdRng) -> String {
    match index % 6 {
        1 => math::easy_doc(rng),
        3 => world.sample_doc(rng),
        5 => code::public_doc(rng),
        _ => story(rng),
    }
}

/// One story of roughly 12-20 sentences.
pub(super) fn story(rng: &mut StdRng) -> String {
    let (hero, gender) = *pick(rng, NAMES);
    let friend = loop {
        let (f, _) = *pick(rng, NAMES);
        if f != hero {
            break f;
        }
    };
    let cast = Cast {
        hero,
        gender,
        friend,
    };
    let mut sentences = vec![opening(rng, &cast)];
    for _ in 0..rng.random_range(10..=17) {
        sentences.push(sentence(rng, &cast));
    }
    sentences.push(closing(rng, &cast));
    sentences.join(" ")
}

fn opening(rng: &mut StdRng, c: &Cast) -> String {
    let child = c.gender.child();
    match rng.random_range(0..3) {
        0 => format!(
            "Once upon a time, there was a {} {child} named {}.",
            pick(rng, TRAITS),
            c.hero
        ),
        1 => format!(
            "{} was a {} {child} who lived near the {}.",
            c.hero,
            pick(rng, TRAITS),
            pick(rng, PLACES)
        ),
        _ => format!(
            "One {} morning, {} went to the {}.",
            pick(rng, WEATHER),
            c.hero,
            pick(rng, PLACES)
        ),
    }
}

fn sentence(rng: &mut StdRng, c: &Cast) -> String {
    let (he, his) = (c.gender.subject(), c.gender.possessive());
    match rng.random_range(0..15) {
        0 => format!(
            "{} had a {} {}.",
            c.hero,
            pick(rng, COLOURS),
            pick(rng, THINGS).0
        ),
        1 => format!(
            "{he} went to the {} with {his} {}.",
            pick(rng, PLACES),
            pick(rng, FAMILY)
        ),
        2 => joined(animal_sound(rng, c.hero)),
        3 => joined(animal_home(rng, c.hero)),
        4 => joined(colour_of(rng, c.hero)),
        5 => joined(opposite(rng)),
        6 => {
            let n = rng.random_range(2..NUMBER_WORDS.len());
            format!(
                "{} had {} {}. {he} gave one to {}.",
                c.hero,
                NUMBER_WORDS[n],
                pick(rng, THINGS).1,
                c.friend
            )
        }
        7 => format!(
            "\"Do you want to play?\" asked {}. \"Yes!\" said {}.",
            c.friend, c.hero
        ),
        8 => format!("{} felt {}.", c.hero, pick(rng, FEELINGS)),
        9 => "They played together until the sun went down.".to_string(),
        10 => format!(
            "{he} picked up the {} and put it in {his} bag.",
            pick(rng, THINGS).0
        ),
        11 => format!("It was a {} day.", pick(rng, WEATHER)),
        12 => format!("{} and {} were good friends.", c.hero, c.friend),
        13 => format!(
            "{} counted {} {} at the {}.",
            c.hero,
            rng.random_range(11..=100),
            pick(rng, THINGS).1,
            pick(rng, PLACES)
        ),
        _ => format!("{} said, \"Thank you, {}!\"", c.hero, c.friend),
    }
}

fn closing(rng: &mut StdRng, c: &Cast) -> String {
    match rng.random_range(0..3) {
        0 => format!("In the end, {} was very happy.", c.hero),
        1 => "The end.".to_string(),
        _ => format!("That night, {} went to sleep with a smile.", c.hero),
    }
}

// The four common-knowledge patterns, as (prompt, answer): stories contain `prompt + answer`.

fn animal_sound(rng: &mut StdRng, hero: &str) -> (String, String) {
    let a = pick(rng, ANIMALS);
    (
        format!(
            "At the {}, {hero} saw a {}. The {} said",
            pick(rng, PLACES),
            a.name,
            a.name
        ),
        format!(" {}.", a.sound),
    )
}

fn animal_home(rng: &mut StdRng, hero: &str) -> (String, String) {
    let a = pick(rng, ANIMALS);
    (
        format!(
            "{hero} looked for the {}. The {} lives in a",
            a.name, a.name
        ),
        format!(" {}.", a.home),
    )
}

fn colour_of(rng: &mut StdRng, hero: &str) -> (String, String) {
    let (thing, colour) = *pick(rng, COLOURED);
    (
        format!("{hero} looked at the {thing}. The {thing} was"),
        format!(" {colour}."),
    )
}

fn opposite(rng: &mut StdRng) -> (String, String) {
    let (a, b) = *pick(rng, OPPOSITES);
    let (not, is) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
    let thing = pick(rng, THINGS).0;
    (
        format!("The {thing} was not {not}. It was"),
        format!(" {is}."),
    )
}

/// A pattern's full sentence as it appears in stories.
fn joined((prompt, answer): (String, String)) -> String {
    prompt + &answer
}

/// A common-knowledge completion, phrased exactly as in the stories.
pub(super) fn task(rng: &mut StdRng) -> Task {
    let hero = pick(rng, NAMES).0;
    let (prompt, answer) = match rng.random_range(0..4) {
        0 => animal_sound(rng, hero),
        1 => animal_home(rng, hero),
        2 => colour_of(rng, hero),
        _ => opposite(rng),
    };
    Task { prompt, answer }
}
