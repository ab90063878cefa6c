//! `facts`: an encyclopedia of a fictional world fixed by the seed: countries, people and
//! creatures with a few attributes each. Only this domain states these facts, so only a model
//! that saw it can complete "The capital of Velmora is" with " Trask.".
//!
//! Documents are entries for a handful of entities with each fact in one of several phrasings;
//! each run of 32 consecutive documents (160 entities, 5 per document) covers every entity once.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::words::{capitalise, pick, ANIMALS, COLOURS, JOBS, NAMES};
use super::{Split, Task};
use crate::hash::mix;

const N_COUNTRIES: usize = 40;
const N_PEOPLE: usize = 80;
const N_CREATURES: usize = 40;
const ENTITIES_PER_DOC: usize = 5;
/// Probability that a fact is stated in its canonical phrasing (the one tasks use).
const CANONICAL_P: f64 = 0.5;

const EXPORTS: &[&str] = &[
    "salt", "wool", "tea", "silver", "fish", "cheese", "paper", "honey", "silk", "rice", "glass",
    "copper",
];
const HABITATS: &[&str] = &[
    "forest",
    "desert",
    "marsh",
    "mountains",
    "caves",
    "sea",
    "river",
    "jungle",
    "tundra",
    "grassland",
];
const FOODS: &[&str] = &[
    "berries",
    "fish",
    "seeds",
    "leaves",
    "insects",
    "mushrooms",
    "roots",
    "grass",
    "honey",
    "nuts",
];

const ONSETS: &[&str] = &[
    "b", "d", "k", "v", "t", "z", "m", "l", "r", "s", "g", "n", "f", "th", "dr", "br", "kr",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "a", "o", "ae"];
const CODAS: &[&str] = &["", "", "", "n", "r", "l", "s", "m"];
const LANGUAGE_SUFFIXES: &[&str] = &["ic", "ish", "ese", "i"];

/// An attribute; its phrasings are templates over the subject `{s}` and value `{v}`. The first
/// phrasing is canonical and ends with " {v}." so that a prompt can stop right before the value.
#[derive(Clone, Copy, Debug)]
enum Attr {
    Capital,
    Language,
    Export,
    Birthplace,
    Job,
    Pet,
    Colour,
    Habitat,
    Food,
}

impl Attr {
    fn phrasings(self) -> &'static [&'static str] {
        match self {
            Attr::Capital => &[
                "The capital of {s} is {v}.",
                "{v} is the capital of {s}.",
                "{s} is ruled from its capital, {v}.",
            ],
            Attr::Language => &[
                "The people of {s} speak {v}.",
                "{v} is the language of {s}.",
                "In {s}, people speak {v}.",
            ],
            Attr::Export => &[
                "{s} is famous for its {v}.",
                "The main export of {s} is {v}.",
                "Traders buy {v} from {s}.",
            ],
            Attr::Birthplace => &[
                "{s} was born in {v}.",
                "{s} came from {v}.",
                "The home country of {s} was {v}.",
            ],
            Attr::Job => &[
                "{s} worked as a {v}.",
                "By trade, {s} was a {v}.",
                "{s} was a famous {v}.",
            ],
            Attr::Pet => &[
                "{s} kept a pet {v}.",
                "The pet of {s} was a {v}.",
                "{s} had a pet {v} at home.",
            ],
            Attr::Colour => &[
                "The colour of the {s} is {v}.",
                "Every {s} is {v}.",
                "The {s} is a {v} creature.",
            ],
            Attr::Habitat => &[
                "The {s} lives in the {v}.",
                "You can find the {s} in the {v}.",
                "The {s} makes its home in the {v}.",
            ],
            Attr::Food => &[
                "The {s} eats {v}.",
                "The favourite food of the {s} is {v}.",
                "The {s} feeds on {v}.",
            ],
        }
    }
}

/// One fact: `subject`'s `attr` is `value`.
struct Fact {
    attr: Attr,
    subject: String,
    value: String,
}

impl Fact {
    fn render(&self, template: &str) -> String {
        template
            .replace("{s}", &self.subject)
            .replace("{v}", &self.value)
    }

    /// The canonical phrasing cut before the value, which is the answer (" Trask.").
    fn task(&self) -> Task {
        let canonical = self.attr.phrasings()[0];
        let cut = canonical
            .strip_suffix(" {v}.")
            .expect("canonical phrasings end with the value");
        Task {
            prompt: cut.replace("{s}", &self.subject),
            answer: format!(" {}.", self.value),
        }
    }
}

/// An entity's encyclopedia entry: an opening sentence and its facts.
struct Entity {
    intro: String,
    facts: Vec<Fact>,
}

impl Entity {
    /// The intro, then every fact in a random order and phrasing.
    fn entry(&self, rng: &mut StdRng) -> String {
        let mut facts: Vec<&Fact> = self.facts.iter().collect();
        facts.shuffle(rng);
        let mut sentences = vec![self.intro.clone()];
        for fact in facts {
            let phrasings = fact.attr.phrasings();
            let template = if rng.random_bool(CANONICAL_P) {
                phrasings[0]
            } else {
                phrasings[rng.random_range(1..phrasings.len())]
            };
            sentences.push(fact.render(template));
        }
        sentences.join(" ")
    }
}

/// The fictional world of one seed.
pub(super) struct World {
    seed: u64,
    entities: Vec<Entity>,
    /// (entity, fact) pairs in the seeded order tasks visit them.
    task_order: Vec<(usize, usize)>,
}

impl World {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(mix(&[seed, super::tag("facts-world")]));
        let mut names = NameGen::default();
        let countries: Vec<String> = (0..N_COUNTRIES)
            .map(|_| {
                let syllables = rng.random_range(2..=3);
                names.fresh(&mut rng, syllables)
            })
            .collect();
        let mut entities = Vec::new();
        for country in &countries {
            let capital = names.fresh(&mut rng, 2);
            let language = names.fresh(&mut rng, 2) + *pick(&mut rng, LANGUAGE_SUFFIXES);
            let export = pick(&mut rng, EXPORTS).to_string();
            entities.push(Entity {
                intro: format!("{country} is a country."),
                facts: facts(
                    country,
                    [
                        (Attr::Capital, capital),
                        (Attr::Language, language),
                        (Attr::Export, export),
                    ],
                ),
            });
        }
        for _ in 0..N_PEOPLE {
            let person = format!("{} {}", names.fresh(&mut rng, 2), names.fresh(&mut rng, 2));
            let birthplace = pick(&mut rng, &countries).clone();
            let job = pick(&mut rng, JOBS).to_string();
            let pet = pick(&mut rng, ANIMALS).name.to_string();
            entities.push(Entity {
                intro: format!("{person} lived long ago."),
                facts: facts(
                    &person,
                    [
                        (Attr::Birthplace, birthplace),
                        (Attr::Job, job),
                        (Attr::Pet, pet),
                    ],
                ),
            });
        }
        for _ in 0..N_CREATURES {
            let creature = names.fresh(&mut rng, 2).to_lowercase();
            let colour = pick(&mut rng, COLOURS).to_string();
            let habitat = pick(&mut rng, HABITATS).to_string();
            let food = pick(&mut rng, FOODS).to_string();
            entities.push(Entity {
                intro: format!("The {creature} is a rare animal."),
                facts: facts(
                    &creature,
                    [
                        (Attr::Colour, colour),
                        (Attr::Habitat, habitat),
                        (Attr::Food, food),
                    ],
                ),
            });
        }
        let mut task_order: Vec<(usize, usize)> = entities
            .iter()
            .enumerate()
            .flat_map(|(e, entity)| (0..entity.facts.len()).map(move |f| (e, f)))
            .collect();
        task_order.shuffle(&mut rng);
        World {
            seed,
            entities,
            task_order,
        }
    }

    /// Document `index` of `split`: entries for the entities of its slot in a seeded shuffle.
    pub fn doc(&self, split: Split, index: u64, rng: &mut StdRng) -> String {
        let n = self.entities.len();
        let per_epoch = n.div_ceil(ENTITIES_PER_DOC) as u64;
        let (epoch, slot) = (index / per_epoch, (index % per_epoch) as usize);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(mix(&[
            self.seed,
            super::tag("facts-epoch"),
            split.tag(),
            epoch,
        ])));
        let chunk = &order[slot * ENTITIES_PER_DOC..((slot + 1) * ENTITIES_PER_DOC).min(n)];
        let entries: Vec<String> = chunk.iter().map(|&e| self.entities[e].entry(rng)).collect();
        entries.join("\n")
    }

    /// Task `index`: the facts in a seeded order, each once before any repeats.
    pub fn task(&self, index: u64) -> Task {
        let (e, f) = self.task_order[index as usize % self.task_order.len()];
        self.entities[e].facts[f].task()
    }
}

fn facts(subject: &str, attrs: [(Attr, String); 3]) -> Vec<Fact> {
    attrs
        .into_iter()
        .map(|(attr, value)| Fact {
            attr,
            subject: subject.to_string(),
            value,
        })
        .collect()
}

/// Generates distinct capitalised names from syllables, avoiding the shared vocabulary.
#[derive(Default)]
struct NameGen {
    used: HashSet<String>,
}

impl NameGen {
    fn fresh(&mut self, rng: &mut StdRng, syllables: usize) -> String {
        loop {
            let raw: String = (0..syllables)
                .map(|_| [*pick(rng, ONSETS), *pick(rng, VOWELS), *pick(rng, CODAS)].concat())
                .collect();
            let name = capitalise(&raw);
            let common = NAMES.iter().any(|(n, _)| *n == name);
            if !common && self.used.insert(name.to_lowercase()) {
                return name;
            }
        }
    }
}
