;; membomb.wat — grows memory one page at a time until refused, then traps.
;;
;; Why: what a guest does when its allocator runs out. memory.grow past the
;; store's limit returns -1 (it does not trap); the guest then aborts with
;; `unreachable`, which the host must classify as `memory`, not a plain trap.
;;
;; Output:  nothing.
(module
  (memory (export "memory") 1)

  (func (export "_start")
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
