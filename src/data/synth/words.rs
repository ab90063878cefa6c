//! Vocabulary shared by the FlexMix domains, so that what a public model knows about these
//! words carries over to every closed domain.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;

/// Grammatical gender of a character name, for pronoun agreement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Gender {
    He,
    She,
}

impl Gender {
    pub fn subject(self) -> &'static str {
        match self {
            Gender::He => "He",
            Gender::She => "She",
        }
    }

    pub fn subject_lower(self) -> &'static str {
        match self {
            Gender::He => "he",
            Gender::She => "she",
        }
    }

    pub fn possessive(self) -> &'static str {
        match self {
            Gender::He => "his",
            Gender::She => "her",
        }
    }

    pub fn child(self) -> &'static str {
        match self {
            Gender::He => "boy",
            Gender::She => "girl",
        }
    }
}

/// Character names with their gender.
pub(super) const NAMES: &[(&str, Gender)] = &[
    ("Tom", Gender::He),
    ("Lily", Gender::She),
    ("Ben", Gender::He),
    ("Mia", Gender::She),
    ("Sam", Gender::He),
    ("Anna", Gender::She),
    ("Max", Gender::He),
    ("Lucy", Gender::She),
    ("Leo", Gender::He),
    ("Emma", Gender::She),
    ("Jack", Gender::He),
    ("Sara", Gender::She),
    ("Noah", Gender::He),
    ("Zoe", Gender::She),
    ("Finn", Gender::He),
    ("Ruby", Gender::She),
    ("Victor", Gender::He),
    ("Vera", Gender::She),
    ("Benjamin", Gender::He),
    ("Anja", Gender::She),
    ("Charlie", Gender::He),
    ("Chloe", Gender::She),
];

/// Countable things as (singular, plural).
pub(super) const THINGS: &[(&str, &str)] = &[
    ("apple", "apples"),
    ("ball", "balls"),
    ("book", "books"),
    ("cup", "cups"),
    ("box", "boxes"),
    ("hat", "hats"),
    ("kite", "kites"),
    ("shell", "shells"),
    ("stone", "stones"),
    ("flower", "flowers"),
    ("cake", "cakes"),
    ("toy", "toys"),
    ("coin", "coins"),
    ("pencil", "pencils"),
    ("egg", "eggs"),
    ("card", "cards"),
];

/// An animal with the sound it makes and where it lives (public common knowledge).
pub(super) struct Animal {
    pub name: &'static str,
    pub sound: &'static str,
    pub home: &'static str,
}

pub(super) const ANIMALS: &[Animal] = &[
    Animal {
        name: "cow",
        sound: "moo",
        home: "barn",
    },
    Animal {
        name: "dog",
        sound: "woof",
        home: "kennel",
    },
    Animal {
        name: "cat",
        sound: "meow",
        home: "house",
    },
    Animal {
        name: "duck",
        sound: "quack",
        home: "pond",
    },
    Animal {
        name: "sheep",
        sound: "baa",
        home: "field",
    },
    Animal {
        name: "pig",
        sound: "oink",
        home: "pen",
    },
    Animal {
        name: "owl",
        sound: "hoot",
        home: "tree",
    },
    Animal {
        name: "bee",
        sound: "buzz",
        home: "hive",
    },
    Animal {
        name: "horse",
        sound: "neigh",
        home: "stable",
    },
    Animal {
        name: "lion",
        sound: "roar",
        home: "den",
    },
    Animal {
        name: "mouse",
        sound: "squeak",
        home: "hole",
    },
    Animal {
        name: "bird",
        sound: "tweet",
        home: "nest",
    },
];

/// Things whose colour is common knowledge, as (thing, colour).
pub(super) const COLOURED: &[(&str, &str)] = &[
    ("sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("sun", "yellow"),
    ("coal", "black"),
    ("tomato", "red"),
    ("banana", "yellow"),
    ("sea", "blue"),
    ("leaf", "green"),
    ("milk", "white"),
    ("carrot", "orange"),
    ("plum", "purple"),
];

/// Adjective pairs; both directions are used.
pub(super) const OPPOSITES: &[(&str, &str)] = &[
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("full", "empty"),
    ("soft", "hard"),
    ("clean", "dirty"),
    ("light", "heavy"),
    ("open", "closed"),
];

pub(super) const COLOURS: &[&str] = &[
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "pink",
];

pub(super) const PLACES: &[&str] = &[
    "park", "garden", "farm", "school", "beach", "forest", "river", "market", "kitchen", "hill",
];

pub(super) const JOBS: &[&str] = &[
    "baker", "painter", "sailor", "farmer", "teacher", "doctor", "builder", "singer", "potter",
    "weaver", "miner", "poet",
];

pub(super) const NUMBER_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// A uniformly chosen element of a non-empty constant table.
pub(super) fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    items.choose(rng).expect("word tables are non-empty")
}

/// Upper-cases the first letter.
pub(super) fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
