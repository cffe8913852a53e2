;; response_head_lines.wat — a header block of 2,000,001 lines: a content-type,
;; then 2,000,000 × "x:y", then the blank line. No body.
;;
;; Why: parsing and encoding a head grows with its lines. Unbounded, this one
;; held the event loop 3-5 s, and every tenant of the worker waited. The host
;; must refuse it (502, naming the bound) without ever scanning it on the loop.
;; 8,000,026 bytes: under the default max_response_bytes (8 MiB).
;;
;; Output:  content-type: text/plain
;;          x:y  (2,000,000 times)
;;          (blank line)
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 123)  ;; 8,060,928 bytes

  (global $OUT i32 (i32.const 16))
  (global $LINES i32 (i32.const 41))      ;; right after the content-type line
  (global $LINES_END i32 (i32.const 8000041))  ;; 2,000,000 lines of 4 bytes
  (global $OUT_LEN i32 (i32.const 8000026))    ;; 25 + 8,000,000 + 1

  (data (i32.const 16) "content-type: text/plain\n")  ;; 25 bytes

  ;; Write [ptr, ptr+len) to fd, retrying short writes; stops on an error or a
  ;; write that makes no progress.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  (func (export "_start")
    (local $at i32)
    (local.set $at (global.get $LINES))
    (loop $line
      (i32.store (local.get $at) (i32.const 0x0a793a78))  ;; "x:y\n", little-endian
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br_if $line (i32.lt_u (local.get $at) (global.get $LINES_END))))
    (i32.store8 (global.get $LINES_END) (i32.const 0x0a))  ;; the blank line
    (call $write_all (i32.const 1) (global.get $OUT) (global.get $OUT_LEN))))
