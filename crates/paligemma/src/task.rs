//! Typed tasks: the prompts PaliGemma was trained with, and which parser reads
//! the answer.
use crate::{Error, Result};

/// A prompt for the model. [`Task::prompt`] renders the exact text the model was
/// trained with; [`Task::parse`] reads any prompt text back into a task (unknown
/// forms become [`Task::Text`]). Serialised as that text, so configuration files and
/// messages carry prompts as people write them, and a malformed one fails to load.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Task {
    /// `caption LANG`: a caption of the image.
    Caption {
        /// Language of the answer (`en`, `de`, `pt-BR`...).
        lang: String,
    },
    /// `describe LANG`: a description of the image (parsed like a caption).
    Describe {
        /// Language of the answer (`en`, `de`, `pt-BR`...).
        lang: String,
    },
    /// `ocr`: the text written in the image.
    Ocr,
    /// `answer LANG QUESTION`: answers a question about the image.
    Answer {
        /// Language of the question and answer.
        lang: String,
        /// The question.
        question: String,
    },
    /// `question LANG ANSWER`: asks for a question about the image that has this answer.
    Question {
        /// Language of the question and answer.
        lang: String,
        /// The answer to find a question for.
        answer: String,
    },
    /// `detect A ; B`: a box for each object of these kinds.
    Detect {
        /// Names of the objects to find (at least one).
        labels: Vec<String>,
    },
    /// `segment A ; B`: a box and a mask for each object of these kinds.
    Segment {
        /// Names of the objects to find (at least one).
        labels: Vec<String>,
    },
    /// Any other prompt, sent to the model as written.
    Text {
        /// The prompt, trimmed.
        text: String,
    },
}

/// Splits `a ; b ;c` into labels, dropping empty ones.
fn labels(list: &str) -> Vec<String> {
    list.split(';')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

fn check_lang(lang: &str) -> Result<()> {
    if lang.is_empty()
        || lang.len() > 16
        || !lang
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Prompt(format!(
            "{lang:?} is not a language code (like en, de, pt-BR)"
        )));
    }
    Ok(())
}

impl Task {
    /// Reads a prompt: `caption en`, `describe en`, `ocr`, `answer en QUESTION`,
    /// `question en ANSWER`, `detect A ; B`, `segment A ; B`; anything else is free text.
    pub fn parse(prompt: &str) -> Result<Task> {
        let p = prompt.trim();
        if p.is_empty() {
            return Err(Error::Prompt("the prompt is empty".into()));
        }
        if p.contains(['\n', '\r']) {
            return Err(Error::Prompt(
                "the prompt contains a line break (PaliGemma prompts are one line)".into(),
            ));
        }
        let (head, rest) = p.split_once(' ').map_or((p, ""), |(h, r)| (h, r.trim()));
        let word_then_text = |rest: &str| -> Option<(String, String)> {
            let (lang, text) = rest.split_once(' ')?;
            Some((lang.to_string(), text.trim().to_string()))
        };
        let task = match head {
            "caption" | "describe" if !rest.is_empty() && !rest.contains(' ') => {
                check_lang(rest)?;
                if head == "caption" {
                    Task::Caption { lang: rest.into() }
                } else {
                    Task::Describe { lang: rest.into() }
                }
            }
            "ocr" if rest.is_empty() => Task::Ocr,
            "answer" | "question" => match word_then_text(rest) {
                Some((lang, text)) if !text.is_empty() && check_lang(&lang).is_ok() => {
                    if head == "answer" {
                        Task::Answer {
                            lang,
                            question: text,
                        }
                    } else {
                        Task::Question { lang, answer: text }
                    }
                }
                _ => Task::Text { text: p.into() },
            },
            "detect" | "segment" => {
                let labels = labels(rest);
                if labels.is_empty() {
                    return Err(Error::Prompt(format!(
                        "{head:?} needs at least one object name, e.g. \"{head} cat ; dog\""
                    )));
                }
                if head == "detect" {
                    Task::Detect { labels }
                } else {
                    Task::Segment { labels }
                }
            }
            _ => Task::Text { text: p.into() },
        };
        Ok(task)
    }

    /// The exact prompt text (without the image tokens, `<bos>` and newline the
    /// tokenizer adds).
    pub fn prompt(&self) -> String {
        match self {
            Task::Caption { lang } => format!("caption {lang}"),
            Task::Describe { lang } => format!("describe {lang}"),
            Task::Ocr => "ocr".into(),
            Task::Answer { lang, question } => format!("answer {lang} {question}"),
            Task::Question { lang, answer } => format!("question {lang} {answer}"),
            Task::Detect { labels } => format!("detect {}", labels.join(" ; ")),
            Task::Segment { labels } => format!("segment {}", labels.join(" ; ")),
            Task::Text { text } => text.clone(),
        }
    }

    /// What kind of task this is (its first word, or `text`).
    pub fn kind(&self) -> TaskKind {
        match self {
            Task::Caption { .. } => TaskKind::Caption,
            Task::Describe { .. } => TaskKind::Describe,
            Task::Ocr => TaskKind::Ocr,
            Task::Answer { .. } => TaskKind::Answer,
            Task::Question { .. } => TaskKind::Question,
            Task::Detect { .. } => TaskKind::Detect,
            Task::Segment { .. } => TaskKind::Segment,
            Task::Text { .. } => TaskKind::Text,
        }
    }
}

/// The kind of a [`Task`], as result messages name it (`"caption"`, `"detect"`...).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// A [`Task::Caption`].
    Caption,
    /// A [`Task::Describe`].
    Describe,
    /// A [`Task::Ocr`].
    Ocr,
    /// A [`Task::Answer`].
    Answer,
    /// A [`Task::Question`].
    Question,
    /// A [`Task::Detect`].
    Detect,
    /// A [`Task::Segment`].
    Segment,
    /// A [`Task::Text`] (the default).
    #[default]
    Text,
}

impl TaskKind {
    /// The kind's name: the prompt's first word, or `text`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Caption => "caption",
            TaskKind::Describe => "describe",
            TaskKind::Ocr => "ocr",
            TaskKind::Answer => "answer",
            TaskKind::Question => "question",
            TaskKind::Detect => "detect",
            TaskKind::Segment => "segment",
            TaskKind::Text => "text",
        }
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Task> for String {
    fn from(task: Task) -> String {
        task.prompt()
    }
}

impl TryFrom<String> for Task {
    type Error = Error;
    fn try_from(text: String) -> Result<Task> {
        Task::parse(&text)
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.prompt())
    }
}
