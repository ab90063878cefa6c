//! `facts`: an encyclopedia of a fictional world fixed by the seed: countries, people and
//! creatures with a few attributes each. Only this domain states these facts, so only a model
//! that saw it can complete "The capital of Velmora is" with " Trask.".
//!
//! Each seed has two disjoint encyclopedias in the same format ([`Worlds`]): the closed one
//! (160 entities) that only `facts` describes and its tasks ask about, and a small public one
//! (42 entities) that `public` describes, so a public model knows the templates, the attribute
//! values and the name syllables but none of the closed facts. Invented names are unique across
//! both and never a word that other text uses, so a closed entity's name occurs nowhere outside
//! `facts`.
//!
//! Closed documents are entries for a handful of entities with each fact in one of several
//! phrasings; each run of 32 consecutive documents (160 entities, 5 per document) covers every
//! entity once.

use std::collections::HashSet;
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use super::words::{capitalise, pick, ANIMALS, COLOURS, JOBS};
use super::{Split, Task};
use crate::hash::mix;

/// How many entities of each kind an encyclopedia has.
struct Census {
    countries: usize,
    people: usize,
    creatures: usize,
}

/// The closed world: only `facts` describes it.
const CLOSED: Census = Census {
    countries: 40,
    people: 80,
    creatures: 40,
};
/// The public world: `public` describes it, in the same templates. It is just large enough to
/// use every value of every attribute (12 exports, jobs and pets; 10 colours, habitats, foods).
const PUBLIC: Census = Census {
    countries: 12,
    people: 20,
    creatures: 10,
};
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

/// The opening sentence of a country's, a person's and a creature's entry.
const INTROS: [&str; 3] = [
    "{s} is a country.",
    "{s} lived long ago.",
    "The {s} is a rare animal.",
];

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
    const ALL: [Attr; 9] = [
        Attr::Capital,
        Attr::Language,
        Attr::Export,
        Attr::Birthplace,
        Attr::Job,
        Attr::Pet,
        Attr::Colour,
        Attr::Habitat,
        Attr::Food,
    ];

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

/// The two encyclopedias of one seed, with disjoint entity names.
pub(super) struct Worlds {
    pub public: World,
    pub closed: World,
}

impl Worlds {
    pub fn new(seed: u64) -> Self {
        let mut names = NameGen::default();
        // The closed world comes first, so that it does not depend on the public one.
        let closed = World::build(seed, &CLOSED, "facts-world", &mut names);
        let public = World::build(seed, &PUBLIC, "public-world", &mut names);
        Worlds { public, closed }
    }
}

/// One fictional encyclopedia.
pub(super) struct World {
    seed: u64,
    entities: Vec<Entity>,
    /// (entity, fact) pairs in the seeded order tasks visit them.
    task_order: Vec<(usize, usize)>,
}

impl World {
    /// Invents `census`'s entities from the random stream `stream` of `seed`, taking every name
    /// from `names`. People are born in this world's countries.
    fn build(seed: u64, census: &Census, stream: &str, names: &mut NameGen) -> Self {
        let mut rng = StdRng::seed_from_u64(mix(&[seed, super::tag(stream)]));
        let countries: Vec<String> = (0..census.countries)
            .map(|_| {
                let syllables = rng.random_range(2..=3);
                names.fresh(&mut rng, syllables)
            })
            .collect();
        let mut entities = Vec::new();
        let exports = deal(&mut rng, EXPORTS, census.countries);
        for (country, export) in countries.iter().zip(exports) {
            let capital = names.fresh(&mut rng, 2);
            let language = names.fresh(&mut rng, 2) + *pick(&mut rng, LANGUAGE_SUFFIXES);
            entities.push(Entity {
                intro: INTROS[0].replace("{s}", country),
                facts: facts(
                    country,
                    [
                        (Attr::Capital, capital),
                        (Attr::Language, language),
                        (Attr::Export, export.to_string()),
                    ],
                ),
            });
        }
        let animals: Vec<&str> = ANIMALS.iter().map(|a| a.name).collect();
        let birthplaces = deal(&mut rng, &countries, census.people);
        let jobs = deal(&mut rng, JOBS, census.people);
        let pets = deal(&mut rng, &animals, census.people);
        for ((birthplace, job), pet) in birthplaces.into_iter().zip(jobs).zip(pets) {
            let person = format!("{} {}", names.fresh(&mut rng, 2), names.fresh(&mut rng, 2));
            entities.push(Entity {
                intro: INTROS[1].replace("{s}", &person),
                facts: facts(
                    &person,
                    [
                        (Attr::Birthplace, birthplace),
                        (Attr::Job, job.to_string()),
                        (Attr::Pet, pet.to_string()),
                    ],
                ),
            });
        }
        let colours = deal(&mut rng, COLOURS, census.creatures);
        let habitats = deal(&mut rng, HABITATS, census.creatures);
        let foods = deal(&mut rng, FOODS, census.creatures);
        for ((colour, habitat), food) in colours.into_iter().zip(habitats).zip(foods) {
            let creature = names.fresh(&mut rng, 2).to_lowercase();
            entities.push(Entity {
                intro: INTROS[2].replace("{s}", &creature),
                facts: facts(
                    &creature,
                    [
                        (Attr::Colour, colour.to_string()),
                        (Attr::Habitat, habitat.to_string()),
                        (Attr::Food, food.to_string()),
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

    /// Entries for a few entities drawn at random (how `public` mixes its small world in).
    pub fn sample_doc(&self, rng: &mut StdRng) -> String {
        let chosen: Vec<&Entity> = self
            .entities
            .choose_multiple(rng, ENTITIES_PER_DOC)
            .collect();
        let entries: Vec<String> = chosen.iter().map(|e| e.entry(rng)).collect();
        entries.join("\n")
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

/// `n` values from `table` in a random order, each used once before any is used again, so a
/// world with at least as many entities as values uses every value.
fn deal<T: Clone>(rng: &mut StdRng, table: &[T], n: usize) -> Vec<T> {
    let mut dealt = Vec::with_capacity(n);
    while dealt.len() < n {
        let mut round = table.to_vec();
        round.shuffle(rng);
        round.truncate(n - dealt.len());
        dealt.extend(round);
    }
    dealt
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

/// Generates distinct capitalised names from syllables, never a word of [`reserved_words`].
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
            if !reserved_words().contains(&raw) && self.used.insert(raw.clone()) {
                return capitalise(&raw);
            }
        }
    }
}

/// Documents of each other generator in the sample that [`reserved_words`] reads; enough that
/// every template and every word-table entry occurs in it.
const VOCABULARY_SAMPLE_DOCS: u64 = 100;

/// Every lower-case word of the text around invented names: a fixed sample of every other
/// generator's documents, plus the encyclopedia's own templates and value tables. Names avoid
/// these words (the syllables can spell "river" or "baker"), so a name means only its entity.
/// The sample does not depend on the seed.
fn reserved_words() -> &'static HashSet<String> {
    static WORDS: OnceLock<HashSet<String>> = OnceLock::new();
    WORDS.get_or_init(|| {
        let mut text: Vec<String> = Vec::new();
        for i in 0..VOCABULARY_SAMPLE_DOCS {
            let rng = &mut StdRng::seed_from_u64(mix(&[super::tag("vocabulary"), i]));
            text.push(super::public::story(rng));
            text.push(super::math::doc(rng));
            text.push(super::math::easy_doc(rng));
            text.push(super::code::doc(rng));
            text.push(super::code::public_doc(rng));
        }
        text.extend(INTROS.iter().map(|t| t.to_string()));
        for attr in Attr::ALL {
            text.extend(attr.phrasings().iter().map(|t| t.to_string()));
        }
        for table in [EXPORTS, HABITATS, FOODS] {
            text.extend(table.iter().map(|t| t.to_string()));
        }
        text.iter()
            .flat_map(|t| t.split(|c: char| !c.is_ascii_alphabetic()))
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    })
}
