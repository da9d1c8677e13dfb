%%%----------------------------------------------------------------------
%%% mod_push_py_port: the port owner of mod_push_py and its keeper.
%%%
%%% One port owner per virtual host (a gen_server registered under mod_push_py's
%%% process name) runs `python -m pymod_push' as an Erlang port, says hello, batches
%%% the hooks' events into frames, holds them while Python is down or far behind,
%%% sends unacknowledged batches again to the next Python process, and executes the
%%% actions Python sends back (IQ answers, publishes to app servers, routed stanzas,
%%% options forms, ejabberdctl answers). The keeper (a second process, doing nothing
%%% else) owns the ETS tables, so that events, batches and pending IQs outlive a
%%% crash of the port owner. send_event/2 and send_iq/4 are how the hooks reach it.
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py_port).
-behaviour(gen_server).

%% mod_push_py: starting and stopping, the hooks' events and IQs, process and table names
-export([start_processes/2, stop_processes/1, send_event/2, send_iq/4,
         proc/1, keeper_proc/1, events_table/1, rate_table/1, meta_table/1,
         options_table/1, ios_extensions/1]).
%% gen_server (the port owner and the keeper)
-export([start_link/2, init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).

-include("xmpp.hrl").
-include("logger.hrl").
-include("translate.hrl").

-import(mod_push_py_opt, [opt/2]).
-import(mod_push_py, [xml_binary/1]).

-define(PROTOCOL_VERSION, 7).
-define(MAX_BATCH, 64).
-define(MIN_BACKOFF, 1000).
-define(MAX_BACKOFF, 60000).
%% Python acknowledges each batch once its effects are committed; no progress for
%% this long means it hangs, and it is killed and restarted.
-define(ACK_TIMEOUT, 60000).
%% ejabberd has no hook for 'ejabberdctl set_loglevel': look now and then.
-define(LOGLEVEL_CHECK, 10000).
%% A token bucket idle this long is full again: it is forgotten.
-define(RATE_FORGET, 60000).

-record(state, {host              :: binary(),
                port              :: port() | undefined,
                status = starting :: starting | up | down | disabled,
                %% Events are {Key, Event}: Key is the event's key in the events table
                %% (see send_event/2), deleted once Python has acknowledged it.
                batch = []        :: [{integer(), term()}],  % not yet written, newest first
                batch_len = 0     :: non_neg_integer(),
                %% Events kept while Python is down or far behind, oldest first; once
                %% any is held, newer ones queue behind it (events stay in order).
                held = queue:new() :: queue:queue({integer(), term()}),
                held_len = 0      :: non_neg_integer(),
                queue_size = 1    :: pos_integer(),  % the option, read once per start
                %% Batches written but not acknowledged, oldest first, by the keys of their
                %% events: sent again, with their sequence numbers, to the next Python
                %% process if this one dies (the events are read from the events table
                %% then; they are not kept on this process's heap meanwhile).
                epoch             :: integer(),
                seq = 0           :: non_neg_integer(),
                unacked = queue:new() :: queue:queue({pos_integer(), [integer()]}),
                unacked_len = 0   :: non_neg_integer(),
                ack_timer         :: reference() | undefined,
                dropped = 0       :: non_neg_integer(),
                backoff = ?MIN_BACKOFF :: pos_integer(),
                %% Keys of the events a crashed predecessor left in the table: already
                %% queued here, so their {event, Key, Event} messages are ignored.
                recovered = #{}   :: #{integer() => true},
                %% For ejabberdctl: the running process's hello, when it said it, how
                %% often it was restarted, and commands waiting for its answer.
                info = #{}        :: map(),
                up_since          :: integer() | undefined,
                restarts = 0      :: non_neg_integer(),
                commands = #{}    :: #{reference() => {atom(), gen_server:from()}},
                loglevel          :: atom(),
                %% Made once: the tables' names, the host's JID (the publishes' sender),
                %% and the app servers' JIDs as Python names them (mod_push_py_actions:app_server/2).
                events            :: atom(),
                meta              :: atom(),
                server_jid        :: jid() | undefined,
                app_servers = #{} :: #{binary() => jid()}}).


-type keeper() :: {keeper, binary()}.

%%%===================================================================
%%% Started and stopped by mod_push_py
%%%===================================================================
%% The keeper first: it owns the tables that outlive a crash of the port owner.
%% gen_mod runs init/1 of this module under the names of proc/1 and keeper_proc/1.
-spec start_processes(binary(), gen_mod:opts()) -> {ok, pid()} | {error, term()}.
start_processes(Host, Opts) ->
    remember(Host),
    case gen_mod:start_child(?MODULE, Host, keeper, keeper_proc(Host)) of
        {ok, _} ->
            case gen_mod:start_child(?MODULE, Host, Opts, proc(Host)) of
                {ok, _} = Ok -> Ok;
                Err -> gen_mod:stop_child(keeper_proc(Host)), Err
            end;
        Err -> Err
    end.

-spec stop_processes(binary()) -> ok | {error, term()}.
stop_processes(Host) ->
    gen_mod:stop_child(proc(Host)),
    Result = gen_mod:stop_child(keeper_proc(Host)),
    persistent_term:erase({?MODULE, Host}),
    Result.

%% What the hooks need for every stanza, made once per start or reload of the module
%% rather than per event: the names of the events table and of the port owner (atoms
%% made from the host: gen_mod:get_module_proc/2 builds a binary and looks it up in the
%% atom table) and the option ios_extensions (gen_mod:get_module_opt/3 copies all the
%% module's options out of ETS).
remember(Host) ->
    Hot = {events_table(Host), proc(Host), opt(Host, ios_extensions) == true},
    case persistent_term:get({?MODULE, Host}, undefined) of
        Hot -> ok;  % the same: a put would make every process check its references
        _ -> persistent_term:put({?MODULE, Host}, Hot)
    end.

hot(Host) ->
    case persistent_term:get({?MODULE, Host}, undefined) of
        undefined -> {events_table(Host), proc(Host), opt(Host, ios_extensions) == true};
        Hot -> Hot
    end.

-spec ios_extensions(binary()) -> boolean().
ios_extensions(Host) ->
    element(3, hot(Host)).

%%%===================================================================
%%% The hooks' events and IQs (run in the hooks' processes), names
%%%===================================================================
%% Every event is stored in the events table before the port owner hears of it, and
%% stays there until Python has acknowledged it: what the port owner had not passed
%% on survives its crash (see recover/2). The table belongs to the keeper process.
-spec send_event(binary(), term()) -> ok.
send_event(Host, Event) ->
    {Table, Proc, _} = hot(Host),
    Key = erlang:unique_integer([monotonic]),
    try
        ets:insert(Table, {Key, Event}),
        %% The event itself goes too: the port owner, which every event passes, does
        %% not read it back from the table (the table is for its successor).
        Proc ! {event, Key, Event}
    catch error:badarg ->
            ok  % the module is stopping, or the port owner restarting (it finds the event)
    end,
    ok.

%% The IQ waits in the table for Python's answer; its timer goes to whichever port
%% owner is registered when it runs out, so that the IQ is answered in any case.
-spec send_iq(binary(), iq(), reference(), term()) -> ok.
send_iq(Host, IQ, Ref, Event) ->
    Timeout = opt(Host, reply_timeout),
    try
        ets:insert(meta_table(Host), {{iq, Ref}, IQ, erlang:monotonic_time(millisecond) + Timeout}),
        erlang:start_timer(Timeout, proc(Host), {iq, Ref})
    catch error:badarg ->
            ok
    end,
    send_event(Host, Event).

%% The port owner's name is mod_push_py's process name, as when the shim was one module.
-spec proc(binary()) -> atom().
proc(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py).

-spec keeper_proc(binary()) -> atom().
keeper_proc(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_keeper).

%% Events not yet acknowledged by Python, {Key, Event}, in the order of their keys.
-spec events_table(binary()) -> atom().
events_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_events).

%% Token buckets of push IQs and commands per account, {Account, Tokens, Millisecond}.
-spec rate_table(binary()) -> atom().
rate_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_rates).

%% What the port owner must not forget: epoch, seq, the keys of each batch not
%% acknowledged ({batch, Seq}), push IQs waiting for Python ({iq, Ref}), the restart
%% count, the backoff, held and dropped events, whether a Python process was running, and what
%% Python's last hello said the shim must agree on ({python_fact, Name}).
-spec meta_table(binary()) -> atom().
meta_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_meta).

%% The push options forms Python sends ({User, Fields} and {default, Fields}), read by
%% mod_push_py:disco_info/5; the port owner's own table.
-spec options_table(binary()) -> atom().
options_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_options).

%%%===================================================================
%%% The port owner
%%%===================================================================
-spec start_link(binary(), gen_mod:opts()) -> {ok, pid()} | ignore | {error, term()}.
start_link(Host, Opts) ->
    gen_server:start_link({local, proc(Host)}, ?MODULE, [Host, Opts], []).

%% The keeper: it only owns the tables, so that they outlive the port owner.
-spec init([binary() | keeper | gen_mod:opts()]) -> {ok, #state{} | keeper()}.
init([Host, keeper]) ->
    %% A hash table: its inserts and deletes, two per event, cost less than an
    %% ordered_set's; recover/2 sorts what it finds.
    ets:new(events_table(Host), [named_table, set, public, {write_concurrency, true}]),
    ets:new(meta_table(Host), [named_table, public, {write_concurrency, true}]),
    ets:new(rate_table(Host), [named_table, public, {write_concurrency, true}]),
    ets:new(mod_push_py_up:pending_table(Host), [named_table, public, {write_concurrency, true}]),
    ets:insert(meta_table(Host), [{epoch, erlang:system_time(microsecond)}, {seq, 0},
                                  {restarts, 0}, {backoff, ?MIN_BACKOFF}, {dropped, 0}, {held, 0}]),
    {ok, {keeper, Host}};
init([Host, _Opts]) ->
    process_flag(trap_exit, true),
    %% Messages wait outside the heap: a garbage collection does not copy the queue of
    %% events and publish replies that builds up under load.
    process_flag(message_queue_data, off_heap),
    [ejabberd_router:register_route(Domain, Host) || Domain <- app_server_domains(Host)],
    ets:new(options_table(Host), [named_table, protected, {read_concurrency, true}]),
    erlang:send_after(?LOGLEVEL_CHECK, self(), check_loglevel),
    erlang:send_after(?RATE_FORGET, self(), forget_rates),
    Meta = meta_table(Host),
    [Epoch, Seq, Restarts, Backoff, Dropped] =
        [ets:lookup_element(Meta, Key, 2) || Key <- [epoch, seq, restarts, backoff, dropped]],
    State = #state{host = Host, epoch = Epoch, seq = Seq, restarts = Restarts,
                   backoff = Backoff, dropped = Dropped, queue_size = opt(Host, queue_size),
                   loglevel = ejabberd_logger:get(), events = events_table(Host),
                   meta = Meta, server_jid = jid:make(Host)},
    case ets:lookup(Meta, python) of
        [] -> {ok, open(State)};
        [{python, Running}] -> {ok, recover(Running, State)}
    end.

%% A port owner before this one crashed or was killed, and its Python process ends with
%% it (stdin closed). What it had not got acknowledged is in the tables: its batches go
%% to the next Python process as they were (same epoch and seq), then the events it had
%% not written yet, in order. The restart is counted and waits for the backoff, as when
%% Python dies, which also lets the old process finish its last commit.
recover(Running, #state{host = Host, backoff = Backoff, restarts = Restarts} = State) ->
    Meta = meta_table(Host),
    Events = lists:sort(ets:tab2list(events_table(Host))),  % keys: the order of events
    Found = maps:from_list(Events),
    Batches = lists:sort(ets:select(Meta, [{{{batch, '$1'}, '$2'}, [], [{{'$1', '$2'}}]}])),
    InBatches = maps:from_list([{Key, true} || {_, Keys} <- Batches, Key <- Keys]),
    Unacked = [{Seq, [Key || Key <- Keys, is_map_key(Key, Found)]} || {Seq, Keys} <- Batches],
    Held = [Event || {Key, _} = Event <- Events, not is_map_key(Key, InBatches)],
    Now = erlang:monotonic_time(millisecond),
    [erlang:start_timer(max(0, Deadline - Now), self(), {iq, Ref})
     || [Ref, Deadline] <- ets:match(Meta, {{iq, '$1'}, '_', '$2'})],
    Restarts1 = case Running of
                    true -> Restarts + 1;
                    false -> Restarts  % counted when it exited
                end,
    ?WARNING_MSG("mod_push_py: the port owner restarted on ~ts; ~B event(s) not "
                 "acknowledged and ~B not yet sent are kept, Python starts in ~B ms",
                 [Host, length(Events) - length(Held), length(Held), Backoff]),
    erlang:send_after(Backoff, self(), restart),
    keep(State#state{status = down, restarts = Restarts1,
                     backoff = min(Backoff * 2, ?MAX_BACKOFF),
                     unacked = queue:from_list(Unacked),
                     unacked_len = length(Events) - length(Held),
                     held = queue:from_list(Held), held_len = length(Held),
                     recovered = maps:from_list([{Key, true} || {Key, _} <- Events])},
         false).

%% The counters in the meta table, and whether a Python process runs.
keep(#state{host = Host} = State, Running) ->
    ets:insert(meta_table(Host), [{restarts, State#state.restarts},
                                  {backoff, State#state.backoff},
                                  {dropped, State#state.dropped}, {python, Running}]),
    State.

%% Subdomains served by the app server (its pubsub and registration hosts).
app_server_domains(Host) ->
    lists:usort([D || #{pubsub_host := P, register_host := R} <- opt(Host, backends),
                      D <- [P, R], D /= Host]).

-spec handle_call(term(), gen_server:from(), #state{}) ->
          {reply, term(), #state{}} | {noreply, #state{}}.
handle_call({command, Name, Args}, From, #state{status = up} = State) ->
    {noreply, ask_python(Name, Args, From, State)};
handle_call({command, _Name, _Args}, _From, State) ->
    {reply, shim_status(State), State};
handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

-spec handle_cast(term(), #state{} | keeper()) -> {noreply, #state{} | keeper()}.
handle_cast({route, Pkt}, State) ->
    {noreply, route_to_app_server(Pkt, State)};
handle_cast({reload, _NewOpts}, #state{host = Host, port = Port} = State) ->
    %% The new options reach Python with the next handshake.
    remember(Host),
    ?INFO_MSG("mod_push_py: options changed, restarting the Python process", []),
    try port_close(Port) catch error:badarg -> true end,
    {noreply, open(State#state{port = undefined, backoff = ?MIN_BACKOFF})};
handle_cast(_Msg, {keeper, _} = State) ->
    {noreply, State};
handle_cast(Msg, State) ->
    ?WARNING_MSG("Unexpected cast: ~p", [Msg]),
    {noreply, State}.

-spec handle_info(term(), #state{} | keeper()) -> {noreply, #state{} | keeper()}.
handle_info({event, Key, Event}, #state{recovered = Recovered} = State) ->
    case Recovered of
        #{Key := _} ->  % queued already when this process started
            {noreply, State#state{recovered = maps:remove(Key, Recovered)}};
        _ ->
            {noreply, take_event({Key, Event}, State)}
    end;
handle_info({event, Key}, #state{events = Table, recovered = Recovered} = State) ->
    %% From a hook running the code before this one (a module upgrade), once.
    case Recovered of
        #{Key := _} ->
            {noreply, State#state{recovered = maps:remove(Key, Recovered)}};
        _ ->
            case ets:lookup(Table, Key) of
                [Event] -> {noreply, take_event(Event, State)};
                [] -> {noreply, State}
            end
    end;
handle_info({Port, {data, Bin}}, #state{port = Port} = State) ->
    case mod_push_py_actions:decode(Bin) of
        {ok, Term} -> {noreply, handle_python(Term, State)};
        error ->
            ?ERROR_MSG("mod_push_py: malformed frame from Python (~B bytes), "
                       "ignored", [byte_size(Bin)]),
            {noreply, State}
    end;
handle_info({Port, {exit_status, Status}}, #state{port = Port, status = disabled} = State) ->
    ?INFO_MSG("mod_push_py: Python process exited with status ~B", [Status]),
    {noreply, keep(State#state{port = undefined}, false)};
handle_info({Port, {exit_status, Status}}, #state{port = Port, backoff = Backoff} = State) ->
    Hint = case State#state.status of
               starting -> io_lib:format(" before its handshake: check that '~ts -m pymod_push' "
                                         "runs as the ejabberd user",
                                         [opt(State#state.host, python)]);
               _ -> ""
           end,
    ?ERROR_MSG("mod_push_py: Python process exited with status ~B~ts; "
               "restarting it in ~B ms", [Status, Hint, Backoff]),
    erlang:send_after(Backoff, self(), restart),
    {noreply, keep(State#state{port = undefined, status = down,
                               ack_timer = cancel_ack_timer(State),
                               held = queue:join(queue:from_list(lists:reverse(State#state.batch)),
                                                 State#state.held),
                               held_len = State#state.held_len + State#state.batch_len,
                               batch = [], batch_len = 0, restarts = State#state.restarts + 1,
                               backoff = min(Backoff * 2, ?MAX_BACKOFF)}, false)};
handle_info(restart, #state{port = undefined, status = down} = State) ->
    %% Messages for events found at the start were handled long ago.
    {noreply, open(State#state{recovered = #{}})};
handle_info({ack_timeout, Seq}, #state{port = Port, status = up,
                                       unacked = Unacked} = State) when is_port(Port) ->
    case queue:peek(Unacked) of
        {value, {Seq, _}} ->
            ?ERROR_MSG("mod_push_py: the Python process has not handled an event batch "
                       "for ~B s; killing it (it is restarted and gets the batch again)",
                       [?ACK_TIMEOUT div 1000]),
            case erlang:port_info(Port, os_pid) of
                {os_pid, OsPid} -> os:cmd("kill -9 " ++ integer_to_list(OsPid));
                undefined -> ok
            end,
            {noreply, State#state{ack_timer = undefined}};
        _ ->
            {noreply, State}
    end;
handle_info({ack_timeout, _}, State) ->
    {noreply, State};
handle_info({route, Pkt}, State) ->
    {noreply, route_to_app_server(Pkt, State)};
handle_info(check_loglevel, #state{loglevel = Old} = State) ->
    erlang:send_after(?LOGLEVEL_CHECK, self(), check_loglevel),
    State#state.status == up andalso  % and the counters, for Python's metrics
        write(State#state.port, mod_push_py_actions:counters(State#state.meta)),
    mod_push_py_up:sweep(State#state.host),  % and the pending sessions that ended
    case ejabberd_logger:get() of
        Old -> {noreply, State};
        New -> {noreply, push_event({loglevel, New}, State#state{loglevel = New})}
    end;
handle_info(forget_rates, #state{host = Host} = State) ->
    erlang:send_after(?RATE_FORGET, self(), forget_rates),
    Idle = erlang:monotonic_time(millisecond) - ?RATE_FORGET,
    try ets:select_delete(rate_table(Host), [{{'_', '_', '$1'}, [{'<', '$1', Idle}], [true]}])
    catch error:badarg -> ok  % code loaded into a running module: no table until restart
    end,
    {noreply, State};
handle_info(flush, State) ->
    {noreply, flush(State)};
handle_info({iq_reply, Reply, Ctx}, State) ->  % a publish's or a UnifiedPush push's
    {noreply, push_event(mod_push_py_up:iq_reply(State#state.host, Reply, Ctx), State)};
handle_info({timeout, _TRef, {iq, Ref}}, #state{host = Host} = State) ->
    case ets:take(meta_table(Host), {iq, Ref}) of
        [{_, IQ, _}] ->
            ?WARNING_MSG("mod_push_py: no answer from Python within the reply "
                         "timeout, answering a push IQ with an error", []),
            Txt = ?T("The push service did not answer in time"),
            ejabberd_router:route_error(IQ, xmpp:err_internal_server_error(Txt, IQ#iq.lang));
        [] ->
            ok
    end,
    {noreply, State};
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    %% The port went without its exit_status (which comes first when there is one).
    ?ERROR_MSG("mod_push_py: the port to Python closed: ~p", [Reason]),
    handle_info({Port, {exit_status, -1}}, State);
handle_info({'EXIT', _, _}, State) ->
    {noreply, State};
handle_info(_Info, {keeper, _} = State) ->
    {noreply, State};
handle_info(Info, State) ->
    ?WARNING_MSG("Unexpected info: ~p", [Info]),
    {noreply, State}.

-spec terminate(term(), #state{} | keeper()) -> ok.
terminate(_Reason, {keeper, _}) ->
    ok;
terminate(_Reason, #state{host = Host, port = Port}) ->
    [ejabberd_router:unregister_route(Domain) || Domain <- app_server_domains(Host)],
    try port_close(Port) catch error:badarg -> true end,
    ok.

-spec code_change(term(), #state{} | keeper(), term()) -> {ok, #state{} | keeper()}.
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

open(#state{host = Host} = State0) ->
    State = State0#state{queue_size = opt(Host, queue_size)},
    Python = opt(Host, python),
    %% -P: the working directory (the spool) is not put on sys.path, so that no file
    %% there can shadow a module (Python >= 3.11, which pymod_push requires).
    try open_port({spawn_executable, Python},
                  [{args, ["-P", "-m", "pymod_push"]}, {packet, 4}, binary,
                   exit_status, use_stdio, hide, {cd, spool_dir()}]) of
        Port ->
            write(Port, hello(Host)),
            keep(State#state{port = Port, status = starting}, true)
    catch error:Why ->
            ?ERROR_MSG("mod_push_py: cannot start ~ts -m pymod_push: ~p; "
                       "retrying in ~B ms", [Python, Why, State#state.backoff]),
            erlang:send_after(State#state.backoff, self(), restart),
            keep(State#state{port = undefined, status = down,
                             backoff = min(State#state.backoff * 2, ?MAX_BACKOFF)}, false)
    end.

%% A port that is closing (Python just died) refuses the write: its exit_status is
%% on its way, and what was written goes again to the next Python process.
write(Port, Term) ->
    try port_command(Port, term_to_binary(Term))
    catch error:badarg -> false
    end.

%% The options go as Python reads them (mod_push_py_opt:for_python/1).
hello(Host) ->
    {hello, ?PROTOCOL_VERSION, Host, mod_push_py_opt:for_python(Host)}.

spool_dir() ->
    mnesia:system_info(directory).

%% A stanza for the app server (commands, publishes, disco). Whether the sender may use
%% the built-in app server is an ejabberd access rule, decided here, as push_iq_rate is.
route_to_app_server(#iq{from = #jid{luser = U, lserver = S}, lang = Lang} = IQ,
                    #state{host = Host} = State) ->
    case xmpp:has_subtag(IQ, #adhoc_command{}) andalso
        mod_push_py:take_token(Host, {commands, U, S}) of
        {wait, Seconds} ->
            Error = mod_push_py:too_many(<<"registration commands">>, Host, Seconds, Lang),
            ejabberd_router:route(xmpp:make_error(IQ, Error)),
            State;
        _ -> push_app_server_iq(IQ, State)
    end;
route_to_app_server(#iq{} = IQ, State) ->
    push_app_server_iq(IQ, State);
route_to_app_server(_Pkt, State) ->
    State.  % messages and presences to the app server are not answered

push_app_server_iq(#iq{from = From} = IQ, #state{host = Host} = State) ->
    Allowed = mod_push_py:may_use_backends(Host, opt(Host, access_backends), From),
    push_event({app_server_iq, Allowed, xml_binary(xmpp:encode(IQ))}, State).

%% An event of the port owner's own, stored like the hooks' (send_event/2).
push_event(Event, #state{events = Table} = State) ->
    Key = erlang:unique_integer([monotonic]),
    ets:insert(Table, {Key, Event}),
    take_event({Key, Event}, State).

%% Events are batched: a frame carries every event that arrived while the
%% owner was busy, so a burst costs one port write instead of one per event.
take_event({Key, _}, #state{status = disabled} = State) ->
    forget([Key], State);  % the version mismatch was logged; IQs get their timeout error
take_event(Event, #state{status = up, held_len = 0, unacked_len = Unacked,
                         queue_size = Max} = State) when Unacked < Max ->
    batch_event(Event, State);
take_event(Event, State) ->
    hold_event(Event, State).  % Python is down or far behind: keep it here, bounded

forget(Keys, #state{events = Table} = State) ->
    _ = [ets:delete(Table, Key) || Key <- Keys],
    State.

batch_event(Event, #state{batch = Batch, batch_len = BatchLen} = State) ->
    State1 = State#state{batch = [Event | Batch], batch_len = BatchLen + 1},
    case BatchLen + 1 >= ?MAX_BATCH orelse mailbox_empty() of
        true -> flush(State1);
        false when Batch == [] ->
            %% More messages are waiting; they may not be events (port data, timers),
            %% so make sure this batch is written once they are handled.
            self() ! flush,
            State1;
        false -> State1
    end.

hold_event(Event, #state{held_len = Len, queue_size = Max} = State) ->
    case Len < Max of
        true ->  % counted for Python's metrics (mod_push_py_actions:counters/1)
            ets:update_counter(State#state.meta, held, 1, {held, 0}),
            State#state{held = queue:in(Event, State#state.held), held_len = Len + 1};
        false ->
            Dropped = State#state.dropped + 1,
            ?ERROR_MSG("mod_push_py: Python process unavailable and event queue "
                       "full (~B); dropped an event (~B dropped so far)",
                       [Len, Dropped]),
            ets:insert(meta_table(State#state.host), {dropped, Dropped}),
            forget([element(1, Event)], State#state{dropped = Dropped})
    end.

%% Events kept while Python was down or behind, oldest first, as far as there is room;
%% written in full batches.
release_held(#state{status = up, unacked_len = Unacked, queue_size = Max,
                    held = Held, held_len = Len, batch = Batch,
                    batch_len = BatchLen} = State)
  when Len > 0, Unacked < Max ->
    {{value, Event}, Rest} = queue:out(Held),
    State1 = State#state{batch = [Event | Batch], batch_len = BatchLen + 1, held = Rest,
                         held_len = Len - 1},
    release_held(case BatchLen + 1 >= ?MAX_BATCH of
                     true -> flush(State1);
                     false -> State1
                 end);
release_held(State) ->
    flush(State).

mailbox_empty() ->
    {message_queue_len, 0} == process_info(self(), message_queue_len).

flush(#state{batch = []} = State) ->
    State;
flush(#state{batch = Batch, batch_len = BatchLen, seq = Seq, unacked = Unacked,
             unacked_len = Len} = State) ->
    Events = lists:reverse(Batch),
    Keys = [Key || {Key, _} <- Events],
    %% Recorded before the write: a successor sends it again with the same seq.
    ets:insert(State#state.meta, [{seq, Seq + 1}, {{batch, Seq + 1}, Keys}]),
    State1 = write_batch({Seq + 1, Events}, State),
    State1#state{batch = [], batch_len = 0, seq = Seq + 1,
                 unacked = queue:in({Seq + 1, Keys}, Unacked), unacked_len = Len + BatchLen}.

%% A batch written before and not acknowledged, again (to a new Python process).
write_again({Seq, Keys}, #state{events = Table} = State) ->
    write_batch({Seq, [Event || Key <- Keys, Event <- ets:lookup(Table, Key)]}, State).

write_batch({Seq, Events}, #state{port = Port, epoch = Epoch} = State) ->
    write(Port, {events, Epoch, Seq, [Event || {_, Event} <- Events]}),
    case State#state.ack_timer of
        undefined ->
            State#state{ack_timer = erlang:send_after(?ACK_TIMEOUT, self(), {ack_timeout, Seq})};
        _ -> State
    end.

%% Python committed everything up to Seq.
acknowledge(Seq, #state{unacked = Unacked, unacked_len = Len} = State) ->
    case queue:peek(Unacked) of
        {value, {S, Keys}} when S =< Seq ->
            %% The events first: a batch record without them is harmless.
            forget(Keys, State),
            ets:delete(State#state.meta, {batch, S}),
            acknowledge(Seq, State#state{unacked = queue:drop(Unacked),
                                         unacked_len = Len - length(Keys)});
        {value, {Next, _}} ->
            cancel_ack_timer(State),
            State#state{ack_timer = erlang:send_after(?ACK_TIMEOUT, self(), {ack_timeout, Next})};
        empty ->
            State#state{ack_timer = cancel_ack_timer(State)}
    end.

cancel_ack_timer(#state{ack_timer = undefined}) -> undefined;
cancel_ack_timer(#state{ack_timer = TRef}) -> erlang:cancel_timer(TRef), undefined.

%% The handshake reply, then lists of actions.
handle_python({hello, ?PROTOCOL_VERSION, Info}, #state{status = starting} = State0) ->
    Facts = [features, commands],  % what the hooks answer with: mod_push_py:python_fact/3
    About = maps:without(Facts, Info),  % the process's version and pid, for push_status
    ?INFO_MSG("mod_push_py: Python process ready on ~ts: ~p", [State0#state.host, About]),
    ets:insert(meta_table(State0#state.host),
               [{{python_fact, K}, V} || {K, V} <- maps:to_list(maps:with(Facts, Info)),
                                         is_list(V)]),
    State = State0#state{info = About, up_since = erlang:system_time(second)},
    write(State#state.port, mod_push_py_actions:counters(State#state.meta)),
    %% What the previous process did not acknowledge goes first, as it was: Python
    %% skips a batch whose effects it had committed.
    State1 = lists:foldl(fun write_again/2,
                         keep(State#state{status = up, backoff = ?MIN_BACKOFF}, true),
                         queue:to_list(State#state.unacked)),
    release_held(State1);
handle_python({hello, Version, _Info}, #state{status = starting} = State) ->
    ?ERROR_MSG("mod_push_py: protocol version mismatch on ~ts: this module speaks "
               "version ~B, the Python package at ~ts speaks ~p. Install matching "
               "versions of the Erlang module and the Python package, then "
               "restart the module. Push notifications are disabled until then.",
               [State#state.host, ?PROTOCOL_VERSION,
                opt(State#state.host, python), Version]),
    %% Python exits by itself after its reply; that exit is not restarted.
    forget([Key || {Key, _} <- queue:to_list(State#state.held)],
           State#state{status = disabled, held = queue:new(), held_len = 0});
handle_python(Actions, #state{status = up} = State) when is_list(Actions) ->
    lists:foldl(fun execute/2, State, Actions);
handle_python({log, _, _} = Log, State) ->  % Python may log before its hello
    execute(Log, State);
handle_python(Other, State) ->
    ?ERROR_MSG("mod_push_py: unexpected frame from Python: ~P", [Other, 10]),
    State.

execute({iq_result, _, _} = Answer, #state{meta = Meta} = State) ->
    mod_push_py_actions:answer_iq(Meta, Answer),
    State;
execute({iq_error, _, _, _, _} = Answer, #state{meta = Meta} = State) ->
    mod_push_py_actions:answer_iq(Meta, Answer),
    State;
execute({publish, Ref, To, Node, Fields, Options, Timeout}, State) ->
    execute({publish, Ref, To, Node, Fields, Options, Timeout, []}, State);
execute({publish, Ref, To, Node, Fields, Options, Timeout, Elements},
        #state{server_jid = From} = State) ->
    try mod_push_py_actions:app_server(To, State#state.app_servers) of
        {AppServer, Known} ->
            IQ = #iq{type = set, from = From, to = AppServer,
                     sub_els = [mod_push_py_actions:pubsub(Node, Fields, Options, Elements)]},
            ejabberd_router:route_iq(IQ, Ref, self(), Timeout),
            State#state{app_servers = Known}
    catch error:{bad_jid, _} ->  % answered as the router would answer it
            push_event({iq_reply, Ref, {error, cancel, 'jid-malformed'}}, State)
    end;
execute({command_result, Ref, Text}, #state{commands = Commands} = State) ->
    case maps:take(Ref, Commands) of
        {{Name, From}, Commands1} ->
            Shim = case Name of  % the status has the shim's part first
                       status -> [shim_status(State), "\n"];
                       _ -> []
                   end,
            gen_server:reply(From, iolist_to_binary([Shim, Text])),
            State#state{commands = Commands1};
        error -> State
    end;
execute({ack, Seq}, State) ->
    release_held(acknowledge(Seq, State));
execute(Action, #state{host = Host} = State) ->  % the actions that need no state here
    mod_push_py_actions:execute(Host, Action),
    State.


%% ejabberdctl commands (mod_push_py:command/3 calls the port owner).
ask_python(Name, Args, From, #state{commands = Commands} = State) ->
    Ref = make_ref(),
    push_event({command, Ref, Name, Args},
               State#state{commands = Commands#{Ref => {Name, From}}}).

%% What the shim knows itself: everything when Python cannot answer.
shim_status(#state{status = Status, info = Info, up_since = Since} = State) ->
    Process = case Status of
                  up -> io_lib:format("Python process up since ~ts (pid ~ts, pymod_push ~ts)",
                                      [calendar:system_time_to_rfc3339(Since),
                                       maps:get(pid, Info, <<"?">>),
                                       maps:get(version, Info, <<"?">>)]);
                  _ -> io_lib:format("Python process ~ts", [Status])
              end,
    iolist_to_binary(
      io_lib:format("~ts; restarted ~B time(s); events waiting: ~B held, ~B unacknowledged; "
                    "dropped: ~B", [Process, State#state.restarts, State#state.held_len,
                                    State#state.unacked_len, State#state.dropped])).
