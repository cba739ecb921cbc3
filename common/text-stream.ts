/**
 * The pieces of a streamed text body between separators, as they arrive:
 * etcd's watch (one JSON object a line) and server-sent events (a blank
 * line after each event) are both read this way. A piece split across
 * chunks, or a character split across them, comes out whole.
 */
export async function* textPieces(
  body: AsyncIterable<Uint8Array>,
  separator: string,
): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let text = '';
  for await (const chunk of body) {
    text += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = text.indexOf(separator)) >= 0) {
      yield text.slice(0, end);
      text = text.slice(end + separator.length);
    }
  }
}
