;; hello.wat — answers every request with a fixed plain-text greeting.
;;
;; Why: the smallest useful WAGI guest. It is the demo's first page and the
;; benchmark's baseline: one fd_write, nothing else, so its cost is the host's.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          hello from wasm
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the response.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "content-type: text/plain\n\nhello from wasm\n")  ;; 42 bytes

  (func (export "_start")
    ;; One buffer written to stdout in full: a single iovec never comes back short
    ;; from a regular file, which is what the host gives a guest as stdout.
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 42))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
