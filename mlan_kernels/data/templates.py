"""Conversation templates: how a record's turns become text, and which parts are learned.

A template turns [(role, text)] into segments [(piece, is_label)]: a piece is text (tokenized
without special tokens added) or EOS (the tokenizer's end-of-sequence id); label pieces are the
answers and their end marker (the loss is on them only), the rest is prompt. Pieces are
tokenized one by one, as LLaVA's own preprocessing does per round, so a label never shares a
token with the prompt.

Named templates (TEMPLATES), after LLaVA's conversation templates:
- "mlan" (the default of the synthetic task): `user : {q} assistant : {a}</s>`.
- "plain": the question, a newline, the answer, </s> (LLaVA's conv_llava_plain,
  haotian-liu/LLaVA llava/conversation.py lines 291-298, PLAIN style lines 94-102: messages
  joined by "\\n"; LLaVA uses it to pretrain the projector).
- "vicuna_v1": LLaVA-1.5's template (conv_vicuna_v1, same file lines 242-252, TWO style lines
  54-62): `{system} USER: {q} ASSISTANT: {a}</s>USER: ...`, system "A chat between a curious
  user and an artificial intelligence assistant. The assistant gives helpful, detailed, and
  polite answers to the user's questions."
- "llava_llama_3": LLaVA-NeXT's conv_llava_llama_3 (LLaVA-VL/LLaVA-NeXT llava/conversation.py
  lines 386-397), which renders through Llama-3-Instruct's chat template (LLAMA_3 style, line
  97): `<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>` then per turn
  `<|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|><|start_header_id|>assistant
  <|end_header_id|>\\n\\n{a}<|eot_id|>`, after the BOS (<|begin_of_text|>).
"chat" (ChatTemplate): the tokenizer's own chat template (`apply_chat_template`), split into
prompt and answer pieces by rendering the conversation one turn longer at a time.
"auto": "chat" when the tokenizer has a chat template, else "mlan".
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

EOS = None                                   # a piece that is the tokenizer's eos_id
PROMPT_TEMPLATE = "user : {human} assistant :"
LLAVA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                "visual content that the user provides, and assist the user with a variety of "
                "tasks using natural language.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA_3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"


@dataclass(frozen=True)
class NamedTemplate:
    """system: prompt text before the first turn ("" = none); human: a human turn, "{text}"
    the question (it ends with the assistant's cue); answer: "{text}" the answer; answer_end:
    EOS or a literal end-of-turn text; bos: the sequence starts with the tokenizer's BOS id."""
    name: str
    system: str
    human: str
    answer: str
    answer_end: Optional[str] = EOS
    bos: bool = True

    def segments(self, turns: Sequence[tuple[str, str]], tokenizer=None,
                 generation_prompt: bool = False) -> list[tuple[Optional[str], bool]]:
        """[(piece, is_label)] of `turns`; a conversation ending with a human turn ends with the
        assistant's cue (the prompt to generate from)."""
        pieces = [(self.system, False)] if self.system else []
        for role, text in turns:
            if role == "human":
                pieces.append((self.human.format(text=text), False))
            elif role == "gpt":
                pieces += [(self.answer.format(text=text), True), (self.answer_end, True)]
            else:
                raise ValueError(f'turn role must be "human" or "gpt", got {role!r}')
        return pieces


class ChatTemplate:
    """The tokenizer's chat template. Segments come from rendering the messages up to each
    answer with and without it (add_generation_prompt before an answer), so each answer's
    piece holds the answer and the template's end-of-turn text; a template whose rendering of
    a longer conversation does not start with that of the shorter one is refused."""
    name = "chat"
    bos = False                               # chat templates write the BOS text themselves

    def segments(self, turns, tokenizer, generation_prompt: bool = False):
        roles = {"human": "user", "gpt": "assistant"}
        for role, _ in turns:
            if role not in roles:
                raise ValueError(f'turn role must be "human" or "gpt", got {role!r}')
        messages = [{"role": roles[role], "content": text} for role, text in turns]

        def render(count, prompt):
            return tokenizer.inner.apply_chat_template(messages[:count], tokenize=False,
                                                       add_generation_prompt=prompt)

        pieces, done = [], ""
        for index, (role, _) in enumerate(turns):
            if role == "gpt":
                prompt, full = render(index, True), render(index + 1, False)
                pieces += [(_after(prompt, done), False), (_after(full, prompt), True)]
                done = full
        if turns and turns[-1][0] == "human":
            pieces.append((_after(render(len(turns), generation_prompt), done), False))
        return [(piece, label) for piece, label in pieces if piece]


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError("the tokenizer's chat template renders a longer conversation with a "
                         "different beginning, so answers cannot be told from prompts; pass a "
                         "named template (--template) instead")
    return text[len(prefix):]


TEMPLATES = {
    "mlan": NamedTemplate("mlan", "", PROMPT_TEMPLATE.replace("{human}", "{text}"), "{text}"),
    "plain": NamedTemplate("plain", "", "{text}\n", "{text}"),
    "vicuna_v1": NamedTemplate("vicuna_v1", VICUNA_SYSTEM + " ", "USER: {text} ASSISTANT:", " {text}"),
    "llava_llama_3": NamedTemplate(
        "llava_llama_3", LLAMA_3_HEADER.format(role="system") + LLAVA_SYSTEM + "<|eot_id|>",
        LLAMA_3_HEADER.format(role="user") + "{text}<|eot_id|>" + LLAMA_3_HEADER.format(role="assistant"),
        "{text}", "<|eot_id|>"),
}
TEMPLATE_NAMES = ("auto", "chat") + tuple(TEMPLATES)
Template = Union[NamedTemplate, ChatTemplate]


def get_template(template, tokenizer) -> Template:
    """A template object from a name in TEMPLATE_NAMES (None = "auto") or a template object.
    ValueError naming the template for an unknown name or "chat" without a chat template."""
    if isinstance(template, (NamedTemplate, ChatTemplate)):
        return template
    name = "auto" if template is None else template
    if name == "auto":
        name = "chat" if getattr(tokenizer, "chat_template", None) else "mlan"
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a HuggingFace tokenizer with a chat_template")
        return ChatTemplate()
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {template!r}")
    return TEMPLATES[name]


def encode_segments(segments, tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids, is_label per token) of template segments."""
    ids, is_label = [], []
    for piece, label in segments:
        piece_ids = [tokenizer.eos_id] if piece is EOS else tokenizer.encode(piece)
        ids += piece_ids
        is_label += [label] * len(piece_ids)
    return ids, is_label


def unknown_template_words(template: Template, tokenizer) -> list[str]:
    """Words of the template's own text (an empty question and answer rendered) that the
    tokenizer maps to its unknown token ([] when it has none)."""
    unknown = getattr(tokenizer, "unk_id", None)
    if unknown is None:
        return []
    words = []
    for piece, _ in template.segments([("human", ""), ("gpt", "")], tokenizer):
        if piece is not EOS:
            words += [word for word in piece.split() if unknown in tokenizer.encode(word)]
    return words
