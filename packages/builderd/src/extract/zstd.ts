import { Transform } from "node:stream";
import binding from "zstd-napi/binding.js";
import { InvalidLayerError } from "./errors.js";

/**
 * The largest zstd window a layer may ask for: 2^27 = 128 MiB, libzstd's own default limit for
 * decoders (`zstd` needs --long / --memory beyond it). A frame header alone decides how much
 * memory its decoder takes, so without a limit one small hostile layer could ask for 2 GiB.
 */
export const ZSTD_WINDOW_LOG_MAX = 27;

/**
 * A zstd decoder as a stream (libzstd through zstd-napi's binding): frames one after another,
 * skippable frames too (zstd:chunked keeps its table of contents in one), each frame's window at
 * most 2^windowLogMax bytes (a larger one fails as an InvalidLayerError naming the limit). Fails
 * when the input holds no frame or ends inside one.
 *
 * zstd-napi's own DecompressStream reports a complete input as cut short when an empty chunk
 * follows its last frame, so the loop over ZSTD_decompressStream is Kiln's.
 */
export function zstdDecompressor(windowLogMax = ZSTD_WINDOW_LOG_MAX): Transform {
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
        const tooLarge = /too much memory/i.test((err as Error).message);
        callback(
          tooLarge
            ? new InvalidLayerError(
                `layer cannot be decompressed: its zstd window is larger than the ${2 ** (windowLogMax - 20)} MiB Kiln allows (${(err as Error).message})`,
                undefined,
                { cause: err },
              )
            : (err as Error),
        );
      }
    },
    flush(callback) {
      if (!started) return callback(new Error("no zstd frame"));
      callback(inFrame ? new Error("the data ends inside a zstd frame") : null);
    },
  });
}
