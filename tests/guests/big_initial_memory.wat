;; big_initial_memory.wat — starts with 2048 pages (128 MiB) of memory, then prints
;; a valid response.
;;
;; Why: a module whose initial memory is over the tenant's memory limit fails to
;; instantiate; that must be a clean 500 classified as memory, and with a
;; limit above 128 MiB the same module must run.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          big memory
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 2048)

  (data (i32.const 16) "content-type: text/plain\n\nbig memory\n")  ;; 37 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 37))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
