import { Transform } from "node:stream";
import binding from "zstd-napi/binding.js";

/**
 * A zstd decoder as a stream (libzstd through zstd-napi's binding): frames one after another,
 * skippable frames too (zstd:chunked keeps its table of contents in one), each frame's window at
 * most 2^windowLogMax bytes. Fails when the input holds no frame or ends inside one.
 *
 * zstd-napi's own DecompressStream reports a complete input as cut short when an empty chunk
 * follows its last frame, so the loop over ZSTD_decompressStream is Kiln's.
 */
export function zstdDecompressor(windowLogMax: number): Transform {
  const dctx = new binding.DCtx();
  dctx.setParameter(binding.DParameter.windowLogMax, windowLogMax);
  const outSize = binding.dStreamOutSize();
  let started = false;
  // ZSTD_decompressStream returns 0 once a frame is decoded and flushed; called again with no
  // input it returns the next frame's header size, so only calls that did something count.
  let inFrame = false;
  return new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      try {
        let src = chunk;
        for (;;) {
          const dst = Buffer.allocUnsafe(outSize);
          const [left, produced, consumed] = dctx.decompressStream(dst, src);
          if (produced > 0) this.push(dst.subarray(0, produced));
          if (produced > 0 || consumed > 0) inFrame = left !== 0;
          started ||= consumed > 0;
          src = src.subarray(consumed);
          // Done with the chunk once it is consumed and the decoder had no more than fit.
          if (src.length === 0 && produced < outSize) break;
        }
        callback();
      } catch (err) {
        callback(err as Error);
      }
    },
    flush(callback) {
      if (!started) return callback(new Error("no zstd frame"));
      callback(inFrame ? new Error("the data ends inside a zstd frame") : null);
    },
  });
}
