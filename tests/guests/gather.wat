;; gather.wat — writes its whole response with one fd_write of three buffers.
;;
;; Why: wasmtime's own fd_write writes only the first buffer of a gather
;; write and reports a short count; a guest that ignores the count (as this
;; one does, like Grain and some old toolchains) would lose its blank line and
;; body. The host writes every buffer, so this must answer 200 with the body.
;;
;; Output:  content-type: text/plain      (buffer 1)
;;          (blank line)                  (buffer 2)
;;          gathered from three buffers   (buffer 3)
;;
;; Memory:  0..23 three iovecs {ptr, len}; 32..35 bytes written; 64.. the buffers.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "content-type: text/plain\n")     ;; 25 bytes
  (data (i32.const 96) "\n")                             ;; 1 byte
  (data (i32.const 128) "gathered from three buffers\n") ;; 28 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 25))
    (i32.store (i32.const 8) (i32.const 96))
    (i32.store (i32.const 12) (i32.const 1))
    (i32.store (i32.const 16) (i32.const 128))
    (i32.store (i32.const 20) (i32.const 28))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 3) (i32.const 32)))))
