// The JavaScript ecosystem's clients against a diffgemma server serving the demo model (as "demo") and its
// pirate adapter (as "pirate"): the official OpenAI, Anthropic and Ollama SDKs, and the Vercel AI SDK through
// its OpenAI-compatible, OpenAI (Responses API) and Anthropic providers. Each check's outcome is printed as one
// JSON object keyed by check (a failure as {"error": ...}); tests/test_node_clients.py holds what each must be.
//
//   node tests/clients/check.mjs http://127.0.0.1:PORT
import Anthropic from "@anthropic-ai/sdk";
import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { embedMany, generateText, streamText } from "ai";
import { Ollama } from "ollama";
import OpenAI from "openai";

globalThis.AI_SDK_LOG_WARNINGS = false; // (settings the demo model's providers do not know, said on stderr)
const base = process.argv[2];
const SKY = "Why is the sky blue?";
const FRUIT = "Name a fruit.";
const WEATHER = "What is the weather in Paris?";
const ADD = "What is 3 + 4?";
const weatherTool = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather now in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};
const ask = (question) => [{ role: "user", content: question }];
const results = {};

async function check(name, run) {
  try {
    results[name] = await run();
  } catch (error) {
    results[name] = { error: String(error?.message ?? error).slice(0, 300) };
  }
}

async function streamedText(textStream) {
  let text = "";
  for await (const delta of textStream) text += delta;
  return text;
}

const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
await check("openai models", async () => (await openai.models.list()).data.map((model) => model.id));
await check("openai chat", async () => {
  const reply = await openai.chat.completions.create({ model: "demo", messages: ask(SKY), seed: 0 });
  return [reply.choices[0].message.content, reply.choices[0].finish_reason];
});
await check("openai chat, the adapter", async () => {
  const reply = await openai.chat.completions.create({ model: "pirate", messages: ask(FRUIT), seed: 0 });
  return reply.choices[0].message.content;
});
await check("openai chat stream", async () => {
  const stream = await openai.chat.completions.create({
    model: "demo", messages: ask(FRUIT), seed: 0, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    usage = chunk.usage ?? usage;
  }
  return [text, usage.completion_tokens > 0];
});
await check("openai stream helper", async () => {
  const runner = openai.chat.completions.stream({ model: "demo", messages: ask(FRUIT), seed: 0 });
  return (await runner.finalChatCompletion()).choices[0].message.content;
});
await check("openai thinking", async () => {
  const reply = await openai.chat.completions.create({
    model: "demo", messages: ask(ADD), seed: 0, reasoning_effort: "low",
  });
  return [reply.choices[0].message.reasoning_content, reply.choices[0].message.content];
});
await check("openai tool call", async () => {
  const reply = await openai.chat.completions.create({
    model: "demo", messages: ask(WEATHER), tools: [weatherTool], seed: 0,
  });
  const call = reply.choices[0].message.tool_calls[0].function;
  return [reply.choices[0].finish_reason, call.name, JSON.parse(call.arguments)];
});
await check("openai runTools", async () => {
  const runner = openai.chat.completions.runTools({
    model: "demo",
    messages: ask(WEATHER),
    seed: 0,
    stream: true,
    tools: [{ ...weatherTool, function: { ...weatherTool.function, function: () => "Sunny, 21 C", parse: JSON.parse } }],
  });
  return await runner.finalContent();
});
await check("openai responses", async () => (await openai.responses.create({ model: "demo", input: SKY, seed: 0 })).output_text);
await check("openai responses stream", async () => {
  const stream = await openai.responses.create({ model: "demo", input: FRUIT, stream: true });
  let text = "";
  let last = null;
  for await (const event of stream) {
    if (event.type === "response.output_text.delta") text += event.delta;
    last = event.type;
  }
  return [text, last];
});
await check("openai embeddings", async () => {
  const reply = await openai.embeddings.create({ model: "demo", input: ["a", "b"] });
  return reply.data.map((item) => item.embedding.length);
});

const anthropic = new Anthropic({ baseURL: base, apiKey: "unused", maxRetries: 0 });
await check("anthropic message", async () => {
  const reply = await anthropic.messages.create({ model: "demo", max_tokens: 256, messages: ask(SKY) });
  return [reply.content[0].text, reply.stop_reason];
});
await check("anthropic stream", async () => {
  const stream = anthropic.messages.stream({ model: "demo", max_tokens: 256, messages: ask(FRUIT) });
  const message = await stream.finalMessage();
  return [message.content[0].text, message.stop_reason];
});
await check("anthropic tool use", async () => {
  const reply = await anthropic.messages.create({
    model: "demo",
    max_tokens: 256,
    messages: ask(WEATHER),
    tools: [{ name: "get_weather", description: "The weather now in a city", input_schema: weatherTool.function.parameters }],
  });
  const use = reply.content.find((block) => block.type === "tool_use");
  return [reply.stop_reason, use.name, use.input];
});
await check("anthropic count tokens", async () => (await anthropic.messages.countTokens({ model: "demo", messages: ask(FRUIT) })).input_tokens > 0);

const ollama = new Ollama({ host: base });
await check("ollama chat", async () => (await ollama.chat({ model: "demo", messages: ask(FRUIT) })).message.content);
await check("ollama chat stream", async () => {
  let text = "";
  for await (const part of await ollama.chat({ model: "pirate", messages: ask(FRUIT), stream: true })) {
    text += part.message.content;
  }
  return text;
});
await check("ollama tool call", async () => {
  const reply = await ollama.chat({ model: "demo", messages: ask(WEATHER), tools: [weatherTool] });
  const call = reply.message.tool_calls[0].function;
  return [call.name, call.arguments];
});
await check("ollama list", async () => (await ollama.list()).models.map((model) => model.name));
await check("ollama embed", async () => (await ollama.embed({ model: "demo", input: ["a", "b"] })).embeddings.length);

const providers = {
  "ai-sdk openai-compatible": createOpenAICompatible({ name: "diffgemma", baseURL: `${base}/v1`, includeUsage: true }).chatModel("demo"),
  "ai-sdk openai": createOpenAI({ baseURL: `${base}/v1`, apiKey: "unused" })("demo"),
  "ai-sdk anthropic": createAnthropic({ baseURL: `${base}/v1`, apiKey: "unused" })("demo"),
};
for (const [name, model] of Object.entries(providers)) {
  await check(`${name} generateText`, async () => {
    const result = await generateText({ model, prompt: SKY, seed: 0 });
    return [result.text, result.finishReason];
  });
  await check(`${name} streamText`, async () => {
    const failures = [];
    const result = streamText({ model, prompt: FRUIT, seed: 0, onError: ({ error }) => failures.push(String(error)) });
    const text = await streamedText(result.textStream);
    return [text, await result.finishReason, failures];
  });
}
await check("ai-sdk openai-compatible reasoning", async () => {
  const model = createOpenAICompatible({ name: "diffgemma", baseURL: `${base}/v1` }).chatModel("demo");
  const result = await generateText({
    model, prompt: ADD, seed: 0, providerOptions: { diffgemma: { reasoningEffort: "low" } },
  });
  return [result.reasoningText, result.text];
});
await check("ai-sdk embedMany", async () => {
  const model = createOpenAICompatible({ name: "diffgemma", baseURL: `${base}/v1` }).textEmbeddingModel("demo");
  return (await embedMany({ model, values: ["a", "b"] })).embeddings.map((vector) => vector.length);
});

console.log(JSON.stringify(results));
