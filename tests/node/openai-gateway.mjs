// The official `openai` package against `lifeline gateway` (run by tests/test_gateway.py):
// one completion and one stream, printed as one JSON line for the test to check.
//
//   node openai-gateway.mjs BASE_URL COMPLETION_MODEL STREAM_MODEL
import OpenAI from "openai";

const [baseURL, completionModel, streamModel] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const messages = [{ role: "user", content: "one two three four five six" }];

const { data: completion, response } = await client.chat.completions
  .create({ model: completionModel, messages })
  .withResponse();

// A stream with a reset in it: the SDK hands every chunk over; a Lifeline-aware reader drops
// the last `discard` content chunks when one carries lifeline.reset.
const stream = await client.chat.completions.create({
  model: streamModel,
  messages,
  stream: true,
  stream_options: { include_usage: true },
});
let naive = "";
const pieces = [];
let resets = 0;
let finish = null;
let final = null;
let usage = null;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  if (chunk.usage) usage = chunk.usage;
  if (chunk.lifeline?.reset) {
    resets += 1;
    pieces.splice(pieces.length - chunk.lifeline.reset.discard);
  }
  if (!choice) continue;
  if (choice.delta.content) {
    naive += choice.delta.content;
    pieces.push(choice.delta.content);
  }
  if (choice.finish_reason) {
    finish = choice.finish_reason;
    final = chunk.lifeline;
  }
}

console.log(
  JSON.stringify({
    completion: {
      content: completion.choices[0].message.content,
      finish_reason: completion.choices[0].finish_reason,
      provider: completion.lifeline.provider,
      attempts_header: response.headers.get("x-lifeline-attempts"),
    },
    stream: {
      naive,
      text: pieces.join(""),
      resets,
      finish,
      final_content: final?.content ?? null,
      total_tokens: usage?.total_tokens ?? null,
    },
  }),
);
