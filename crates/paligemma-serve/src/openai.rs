//! The OpenAI chat-completions API, as far as PaliGemma answers it: one user message
//! holding the task as text ("caption en", "detect cup ; plate") and one image, inline
//! as a `data:` URL. The reply's content is the model's text; the typed result (boxes
//! in pixels, scores, masks, track ids) rides along in `paligemma`, which OpenAI
//! clients ignore. Fields a client may send that change nothing here (`user`,
//! `frequency_penalty`...) are accepted and ignored, as other servers do.
use crate::error::ApiError;
use paligemma_stream::ResultMessage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// The older name of `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Answers asked for; only 1 is served.
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl Default for Content {
    fn default() -> Self {
        Content::Text(String::new())
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// What PaliGemma is asked: the task text and the image's URL.
pub struct Asked<'a> {
    pub prompt: String,
    pub image_url: &'a str,
}

impl ChatRequest {
    /// The one user message's task and image. PaliGemma answers a single turn without
    /// a system prompt, so anything else is refused rather than silently dropped.
    pub fn asked(&self) -> Result<Asked<'_>, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
        let [message] = self.messages.as_slice() else {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "PaliGemma answers one user message (a task and an image), not {} messages",
                    self.messages.len()
                ),
            ));
        };
        if message.role != "user" {
            return Err(ApiError::invalid(
                "messages[0].role",
                format!(
                    "the message must be the user's, not {:?} (PaliGemma has no system prompt)",
                    message.role
                ),
            ));
        }
        let parts: &[Part] = match &message.content {
            Content::Parts(parts) => parts,
            Content::Text(_) => {
                return Err(ApiError::invalid_code(
                    "messages[0].content",
                    "missing_image",
                    "the message has no image: send content parts, a text part with the task and an image_url part",
                ));
            }
        };
        let mut prompt = String::new();
        let mut images = Vec::new();
        for part in parts {
            match part {
                Part::Text { text } => {
                    if !prompt.is_empty() {
                        prompt.push(' ');
                    }
                    prompt.push_str(text.trim());
                }
                Part::ImageUrl { image_url } => images.push(image_url.url.as_str()),
            }
        }
        match images.as_slice() {
            [url] => Ok(Asked {
                prompt,
                image_url: url,
            }),
            [] => Err(ApiError::invalid_code(
                "messages[0].content",
                "missing_image",
                "the message has no image_url part; PaliGemma answers about one image",
            )),
            more => Err(ApiError::invalid(
                "messages[0].content",
                format!("{} images; PaliGemma answers about one", more.len()),
            )),
        }
    }

    pub fn token_limit(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn of(msg: &ResultMessage) -> Usage {
        Usage {
            prompt_tokens: msg.tokens.prompt,
            completion_tokens: msg.tokens.generated,
            total_tokens: msg.tokens.prompt + msg.tokens.generated,
        }
    }
}

/// `length` when the answer stopped at its token limit, else `stop`.
pub fn finish_reason(msg: &ResultMessage, max_tokens: usize) -> &'static str {
    if msg.tokens.generated >= max_tokens {
        "length"
    } else {
        "stop"
    }
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// The typed result, as the node publishes it (`paligemma.result/1`).
    pub paligemma: &'a ResultMessage,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
}

/// One server-sent event of a streamed reply (`chat.completion.chunk`).
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk, when `stream_options.include_usage` asks for it (then
    /// with no choices, as OpenAI sends it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Only on the chunk that finishes the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paligemma: Option<&'a ResultMessage>,
}

#[derive(Debug, Serialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}
