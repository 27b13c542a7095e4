//! The canonical example: every reader maps its records onto [`Example`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Location;

/// Training task of a dataset (manifest `task`), which decides the sequence layout
/// (spec §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Plain text LM, layout (a) `lm_prompt`.
    Lm,
    /// Instruction chat, layout (b) `lm_chat_prompt` / (f) LLaDA SFT.
    Chat,
    /// Mixed long-CoT chat (spec §2.4 e): the `<think>` instruction + (b).
    Cot,
    /// Multimodal understanding, layout (d) `mmu_prompt`.
    Mmu,
    /// Text-to-image, layout (c) `t2i_prompt`.
    T2i,
}

impl Task {
    /// The lowercase manifest name.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Lm => "lm",
            Task::Chat => "chat",
            Task::Cot => "cot",
            Task::Mmu => "mmu",
            Task::T2i => "t2i",
        }
    }
}

/// Speaker of a chat turn. LLaVA `from: human | gpt` and ShareGPT `role: user | assistant`
/// both map here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `system`.
    System,
    /// `user` / `human`.
    User,
    /// `assistant` / `gpt`.
    Assistant,
}

impl Role {
    /// The role name written into the chat header (`user`, `assistant`, `system`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Speaker.
    pub role: Role,
    /// Text (for LLaVA data the `<image>` placeholder is removed when the image goes into
    /// the image block).
    pub content: String,
}

/// An image attached to an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A file on disk (already resolved against the manifest's `image_root`).
    Path(PathBuf),
    /// Encoded image bytes (jpeg / png / webp) stored in the record.
    Bytes(Vec<u8>),
    /// Pre-tokenized image codes (codebook indices, `[0, codebook_size)`, row-major).
    Codes(Vec<u32>),
}

/// The canonical record (architecture doc "Key types"): what every reader produces and
/// every layout consumes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    /// Task of the dataset; `None` only for examples built by hand.
    pub task: Option<Task>,
    /// Raw text (task `lm`), or text already in chat-template form (task `chat` when the
    /// data carries the template, like MMaDA's instruct parquet `content`).
    pub text: Option<String>,
    /// The question / problem / instruction.
    pub question: Option<String>,
    /// The reasoning (chain of thought), when the dataset separates it from the answer.
    pub reasoning: Option<String>,
    /// The final answer (or the whole response when there is no separate reasoning).
    pub answer: Option<String>,
    /// Multi-turn conversation (LLaVA `conversations` / ShareGPT `messages`).
    pub messages: Vec<Message>,
    /// Image caption (task `t2i`).
    pub caption: Option<String>,
    /// Image (task `mmu` / `t2i`).
    pub image: Option<ImageRef>,
    /// Record id, when the dataset has one.
    pub id: Option<String>,
    /// Where the record came from (manifest, file, line / row), for error messages.
    pub source: Location,
}
